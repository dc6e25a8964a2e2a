"""A stop request in the middle of training, as when SIGTERM arrives during a step."""
import signal

import task
import train


def signal_at_loss_call(monkeypatch, n: int) -> None:
    """Patch the binary task's loss so that its n-th call (training and validation calls alike) requests a stop."""
    calls, original = [], task.BinaryTask.loss

    def loss_then_signal(self, logits, target, **kwargs):
        calls.append(1)
        if len(calls) == n:
            train.request_stop(signal.SIGTERM, None)
        return original(self, logits, target, **kwargs)

    monkeypatch.setattr(task.BinaryTask, "loss", loss_then_signal)
