"""A stop request in the middle of training, as when SIGTERM arrives during a step."""
import signal

import train


def signal_at_loss_call(monkeypatch, n: int) -> None:
    """Patch train.bce_dice_loss so that its n-th call (training and validation calls alike) requests a stop."""
    calls, original = [], train.bce_dice_loss

    def loss_then_signal(logits, target, **kwargs):
        calls.append(1)
        if len(calls) == n:
            train._request_stop(signal.SIGTERM, None)
        return original(logits, target, **kwargs)

    monkeypatch.setattr(train, "bce_dice_loss", loss_then_signal)
