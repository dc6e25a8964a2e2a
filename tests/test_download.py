"""download.py without the network: a stand-in for the Kaggle API writes real zips."""
from __future__ import annotations

import io
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import dataset  # noqa: E402
import download  # noqa: E402

CARS, VIEWS = ("0cdf5b5d0ce1", "fce0ba5b8ed7"), (1, 2)
SIZE = (32, 24)  # width, height


def jpeg_bytes(seed: int) -> bytes:
    """A tiny real JPEG."""
    pixels = np.random.default_rng(seed).integers(0, 256, (SIZE[1], SIZE[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG")
    return buffer.getvalue()


def mask_bytes() -> bytes:
    """A palette GIF holding 0 (background) and 1 (car), like Kaggle's masks."""
    mask = np.zeros((SIZE[1], SIZE[0]), dtype=np.uint8)
    mask[6:18, 8:24] = 1
    image = Image.fromarray(mask, mode="P")
    image.putpalette([0, 0, 0, 255, 255, 255] + [0, 0, 0] * 254)
    buffer = io.BytesIO()
    image.save(buffer, format="GIF")
    return buffer.getvalue()


def archive_members(zip_name: str) -> dict[str, bytes]:
    """Kaggle's inner layout: train/X.jpg, train_hq/X.jpg, train_masks/X_mask.gif, test/X.jpg."""
    stems = [f"{car}_{view:02d}" for car in CARS for view in VIEWS]
    folder = zip_name[: -len(".zip")]
    if folder == "train_masks":
        return {f"train_masks/{stem}_mask.gif": mask_bytes() for stem in stems}
    return {f"{folder}/{stem}.jpg": jpeg_bytes(i) for i, stem in enumerate(stems)}


def write_zip(path: Path, members: dict[str, bytes]) -> None:
    """A real zip with a folder entry first, as Kaggle's are."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(next(iter(members)).split("/")[0] + "/", b"")
        for name, data in members.items():
            archive.writestr(name, data)


def write_corrupt_zip(path: Path, zip_name: str) -> None:
    """A zip that opens but whose data fails the CRC test."""
    write_zip(path, archive_members(zip_name))
    data = bytearray(path.read_bytes())
    offset = data.index(b"PK\x03\x04", 4)  # the second local header: the first file's data follows
    data[offset + 60: offset + 90] = bytes(30)
    path.write_bytes(bytes(data))


def http_error(status: int) -> requests.exceptions.HTTPError:
    """What kagglesdk raises on an HTTP error: requests' HTTPError carrying the response."""
    response = requests.Response()
    response.status_code = status
    return requests.exceptions.HTTPError(f"{status} Client Error", response=response)


class FakeKaggleApi:
    """Stands in for KaggleApi.competition_download_file and records the calls."""

    def __init__(self, corrupt: dict[str, int] | None = None, wrap: bool = False, error: Exception | None = None):
        self.calls: list[tuple[str, str]] = []
        self.corrupt = dict(corrupt or {})  # zip name -> how many corrupt deliveries before good ones
        self.wrap = wrap                    # deliver X.zip as X.zip.zip holding X.zip, as Kaggle does for big files
        self.error = error

    def competition_download_file(self, competition: str, file_name: str, path: str | None = None,
                                  force: bool = False, quiet: bool = False, unzip: bool = False) -> None:
        self.calls.append((competition, file_name))
        if self.error is not None:
            raise self.error
        target = Path(path) / file_name
        if self.corrupt.get(file_name, 0) > 0:
            self.corrupt[file_name] -= 1
            write_corrupt_zip(target, file_name)
        else:
            write_zip(target, archive_members(file_name))
        if self.wrap:
            wrapper = target.with_name(file_name + ".zip")
            with zipfile.ZipFile(wrapper, "w") as archive:
                archive.write(target, file_name)
            target.unlink()

    def files(self) -> list[str]:
        return [name for _, name in self.calls]


def run_download(out: Path, api: object | None = None, *flags: str) -> int:
    """download.main on the flags, with `api` in place of Kaggle's."""
    return download.main(["--out", str(out), *flags], api=api)


@pytest.fixture
def no_credentials(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty HOME and no KAGGLE_* variables; returns the fake HOME."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("XDG_CONFIG_HOME", raising=False)
    for key in list(os.environ):
        if key.startswith("KAGGLE_"):
            monkeypatch.delenv(key)
    return home


def test_download_extracts_pairs_and_prints_train_command(tmp_path, capsys):
    out = tmp_path / "carvana"
    api = FakeKaggleApi()
    assert run_download(out, api) == 0
    assert api.calls == [(download.COMPETITION, "train.zip"), (download.COMPETITION, "train_masks.zip")]
    pairs = dataset.find_pairs(out)
    assert len(pairs) == len(CARS) * len(VIEWS)
    image, mask = pairs[0]
    assert image.parent == out / "train" and mask.parent == out / "train_masks"
    assert set(np.unique(dataset.load_mask(mask))) == {0, 1}
    assert dataset.load_image(image).shape == (SIZE[1], SIZE[0], 3)
    assert sorted(p.name for p in out.iterdir()) == ["train", "train_masks"]  # no zips or temporary folders left
    captured = capsys.readouterr()
    assert f"python train.py --data-dir {out}" in captured.out
    assert "4 photo/mask pairs" in captured.out
    assert "5088" in captured.err  # warns that this is not the full set


def test_rerun_downloads_nothing(tmp_path, no_credentials, monkeypatch):
    out = tmp_path / "carvana"
    assert run_download(out, FakeKaggleApi()) == 0
    again = FakeKaggleApi()
    assert run_download(out, again) == 0
    assert again.calls == []
    # Nothing to fetch: no credentials needed, and kaggle (which authenticates on import) stays unimported.
    for name in [m for m in sys.modules if m == "kaggle" or m.startswith("kaggle.")]:
        monkeypatch.delitem(sys.modules, name)
    assert run_download(out) == 0
    assert "kaggle" not in sys.modules


def test_valid_zip_in_out_is_reused_and_kept(tmp_path):
    out = tmp_path / "carvana"
    out.mkdir()
    write_zip(out / "train.zip", archive_members("train.zip"))
    api = FakeKaggleApi()
    assert run_download(out, api) == 0
    assert api.files() == ["train_masks.zip"]
    assert (out / "train.zip").is_file()


def test_keep_zips(tmp_path):
    out = tmp_path / "carvana"
    assert run_download(out, FakeKaggleApi(), "--keep-zips") == 0
    assert sorted(p.name for p in (out / download.ZIP_CACHE).iterdir()) == ["train.zip", "train_masks.zip"]


def test_corrupt_zip_on_disk_is_fetched_again(tmp_path, capsys):
    out = tmp_path / "carvana"
    (out / download.ZIP_CACHE).mkdir(parents=True)
    write_corrupt_zip(out / download.ZIP_CACHE / "train.zip", "train.zip")
    assert download.zip_problem(out / download.ZIP_CACHE / "train.zip") is not None
    api = FakeKaggleApi()
    assert run_download(out, api) == 0
    assert api.files() == ["train.zip", "train_masks.zip"]
    assert "corrupt" in capsys.readouterr().err
    assert len(dataset.find_pairs(out)) == 4


def test_corrupt_download_is_fetched_once_more(tmp_path):
    out = tmp_path / "carvana"
    api = FakeKaggleApi(corrupt={"train.zip": 1})
    assert run_download(out, api) == 0
    assert api.files() == ["train.zip", "train.zip", "train_masks.zip"]


def test_download_corrupt_twice_is_an_error(tmp_path, capsys):
    out = tmp_path / "carvana"
    api = FakeKaggleApi(corrupt={"train.zip": 5})
    assert run_download(out, api) == 1
    assert api.files() == ["train.zip", "train.zip"]
    err = capsys.readouterr().err
    assert "error: train.zip was corrupt twice" in err and "Traceback" not in err
    assert not (out / "train").exists()


def test_wrapped_delivery_is_unwrapped(tmp_path):
    out = tmp_path / "carvana"
    assert run_download(out, FakeKaggleApi(wrap=True)) == 0
    assert len(dataset.find_pairs(out)) == 4


def test_hq_extracts_into_train(tmp_path):
    out = tmp_path / "carvana"
    api = FakeKaggleApi()
    assert run_download(out, api, "--hq") == 0
    assert api.files() == ["train_hq.zip", "train_masks.zip"]
    assert len(dataset.find_pairs(out)) == 4
    assert not (out / "train_hq").exists()
    # train/ now holds train_hq.zip's photos: switching back needs --force.
    assert run_download(out, FakeKaggleApi()) == 1
    assert run_download(out, FakeKaggleApi(), "--force") == 0
    assert (out / "train" / download.COMPLETE_MARKER).read_text().strip() == "train.zip"


def test_with_test(tmp_path, capsys):
    out = tmp_path / "carvana"
    api = FakeKaggleApi()
    assert run_download(out, api, "--with-test") == 0
    assert api.files() == ["train.zip", "train_masks.zip", "test.zip"]
    assert len(list((out / "test").glob("*.jpg"))) == 4
    assert "4 test photos" in capsys.readouterr().out


class FakeAuthApi:
    """Stands in for KaggleApi.authenticate: fails as kaggle 2.2.5 does (prints help, exit(1)), raises, or warns."""

    config = "/nowhere/kaggle.json"

    def __init__(self, fail: bool = False, error: Exception | None = None):
        self.fail, self.error = fail, error

    def authenticate(self) -> None:
        if self.error is not None:
            raise self.error
        if self.fail:
            print("Authentication required to call the Kaggle API.")
            sys.exit(1)
        print("Warning: Your Kaggle API key is readable by other users on this system!")


def test_missing_credentials_name_each_source(capsys):
    with pytest.raises(download.DownloadError) as raised:
        download.authenticate(FakeAuthApi(fail=True))
    message = str(raised.value)
    assert message.startswith("no usable Kaggle API credentials")
    for source in ("KAGGLE_API_TOKEN", "~/.kaggle/access_token", "KAGGLE_USERNAME and KAGGLE_KEY",
                   "/nowhere/kaggle.json", "kaggle auth login"):
        assert source in message
    assert download.TOKEN_HELP in message and "Generate New Token" in message
    assert "Authentication required" not in capsys.readouterr().out  # kaggle's own help is replaced, not added


def test_authentication_outcomes(tmp_path, capsys, monkeypatch):
    api = FakeAuthApi()
    assert download.authenticate(api) is api
    assert "readable by other users" in capsys.readouterr().out  # kaggle's warnings are passed on
    with pytest.raises(download.DownloadError, match="checking your Kaggle credentials: cannot reach Kaggle"):
        download.authenticate(FakeAuthApi(error=requests.exceptions.ConnectionError("no network")))
    # main reports a failed authentication as one line, exit status 1.
    monkeypatch.setattr(download, "kaggle_api", lambda: download.authenticate(FakeAuthApi(fail=True)))
    assert run_download(tmp_path / "carvana") == 1
    err = capsys.readouterr().err
    assert err.startswith("error: no usable Kaggle API credentials") and len(err.strip().splitlines()) == 1


def test_kaggle_api_is_created_once_and_only_when_needed(tmp_path, monkeypatch):
    created = []
    monkeypatch.setattr(download, "kaggle_api", lambda: created.append(FakeKaggleApi()) or created[-1])
    out = tmp_path / "carvana"
    assert run_download(out) == 0
    assert len(created) == 1 and created[0].files() == ["train.zip", "train_masks.zip"]
    assert run_download(out) == 0
    assert len(created) == 1


def test_forbidden_points_to_rules(tmp_path, capsys):
    out = tmp_path / "carvana"
    api = FakeKaggleApi(error=http_error(403))
    assert run_download(out, api) != 0
    err = capsys.readouterr().err
    assert err.startswith("error:") and "403" in err
    assert "https://www.kaggle.com/competitions/carvana-image-masking-challenge/rules" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_network_error_is_one_line(tmp_path, capsys):
    api = FakeKaggleApi(error=requests.exceptions.ConnectionError("Failed to resolve www.kaggle.com"))
    assert run_download(tmp_path / "carvana", api) != 0
    err = capsys.readouterr().err
    assert err.startswith("error: downloading train.zip: cannot reach Kaggle") and len(err.strip().splitlines()) == 1


def test_interrupted_extraction_leaves_no_complete_looking_folder(tmp_path, monkeypatch, capsys):
    out = tmp_path / "carvana"
    real_extract = zipfile.ZipFile.extract
    extracted = []

    def extract_then_interrupt(self, member, path=None, pwd=None):
        if len(extracted) == 2:
            raise KeyboardInterrupt
        extracted.append(member)
        return real_extract(self, member, path, pwd)

    monkeypatch.setattr(zipfile.ZipFile, "extract", extract_then_interrupt)
    api = FakeKaggleApi()
    assert run_download(out, api) == 130
    assert "error: interrupted" in capsys.readouterr().err
    assert not (out / "train").exists()
    assert not list(out.glob(download.EXTRACT_PREFIX + "*"))
    monkeypatch.undo()
    # The next run reuses the downloaded zip and finishes.
    again = FakeKaggleApi()
    assert run_download(out, again) == 0
    assert again.files() == ["train_masks.zip"]
    assert len(dataset.find_pairs(out)) == 4


def test_leftovers_of_a_killed_run_are_cleaned(tmp_path):
    out = tmp_path / "carvana"
    stale = out / f"{download.EXTRACT_PREFIX}train-abc123" / "train"
    stale.mkdir(parents=True)
    (stale / "0cdf5b5d0ce1_01.jpg").write_bytes(b"half")
    assert run_download(out, FakeKaggleApi()) == 0
    assert not list(out.glob(download.EXTRACT_PREFIX + "*"))


def test_unrecorded_folder_needs_force(tmp_path, capsys):
    out = tmp_path / "carvana"
    (out / "train").mkdir(parents=True)
    (out / "train" / "0cdf5b5d0ce1_01.jpg").write_bytes(jpeg_bytes(0))
    api = FakeKaggleApi()
    assert run_download(out, api) == 1
    assert api.calls == [] and "--force" in capsys.readouterr().err
    assert run_download(out, api, "--force") == 0
    assert len(dataset.find_pairs(out)) == 4


def test_cli_without_credentials_names_what_is_missing(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("KAGGLE_") and k != "XDG_CONFIG_HOME"}
    env["HOME"] = str(home)
    result = subprocess.run([sys.executable, "download.py", "--out", str(tmp_path / "carvana")],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert result.stderr.startswith("error: no usable Kaggle API credentials")
    assert len(result.stderr.strip().splitlines()) == 1
    for source in ("KAGGLE_API_TOKEN", "~/.kaggle/access_token", "KAGGLE_USERNAME and KAGGLE_KEY", "kaggle.json",
                   "kaggle auth login", "Generate New Token"):
        assert source in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert "Authentication required" not in result.stdout  # kaggle's own help, printed on import, is hidden


def test_a_module_kaggle_needs_but_lacks_is_named_not_kaggle_itself(tmp_path):
    # kaggle 2.2.5 imports six without declaring it: a fresh environment without six said "kaggle is missing"
    blocker = "import sys; sys.modules['six'] = None; import runpy; sys.argv = ['download.py', '--out', %r]; "
    code = blocker % str(tmp_path / "carvana") + "runpy.run_path('download.py', run_name='__main__')"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert "cannot import 'six'" in result.stderr and "pip install -r requirements.txt" in result.stderr
    assert "kaggle package is missing" not in result.stderr and "Traceback" not in result.stderr
    gone = download.missing_package_help(ModuleNotFoundError("No module named 'kaggle'", name="kaggle"))
    assert gone.startswith("the kaggle package is missing")
