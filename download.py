"""Download Carvana from Kaggle and extract it into the layout train.py reads.

    python download.py                      # data/carvana/train, data/carvana/train_masks
    python download.py --hq --with-test     # train_hq.zip instead of train.zip, and test.zip (8 GB)

Needs a Kaggle API token and the competition's rules accepted on kaggle.com. Interrupted runs resume:
finished folders are kept, zips are tested before they are used, extraction is atomic.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import io
import shlex
import shutil
import sys
import tempfile
import zipfile
import zlib
from pathlib import Path
from typing import Callable, Sequence

from tqdm import tqdm

import utils
from dataset import IMAGE_DIR, IMAGE_EXTENSIONS, MASK_DIR, find_pairs, is_hidden
from utils import UserError

COMPETITION = "carvana-image-masking-challenge"
RULES_URL = f"https://www.kaggle.com/competitions/{COMPETITION}/rules"
CARVANA_TRAIN_PAIRS = 5088
TEST_DIR = "test"
ZIP_CACHE = ".zips"                     # OUT/.zips: downloads, kept until extracted
EXTRACT_PREFIX = ".extract-"            # OUT/.extract-train-*: extraction in progress
COMPLETE_MARKER = ".download-complete"  # in OUT/train etc.: names the zip it was fully extracted from
KAGGLE_PARTIAL_SUFFIX = ".kaggle-partial"  # the kaggle package's resume marker next to a partial file
TOKEN_HELP = ("Create a token: sign in at https://www.kaggle.com/settings/api, click Generate New Token under API, "
              "save the token as ~/.kaggle/access_token and run `chmod 600 ~/.kaggle/access_token` "
              "(or export KAGGLE_API_TOKEN=<token>).")


class DownloadError(UserError):
    """A download that cannot go on: missing credentials, a refused request, a corrupt zip."""


# --- the Kaggle API ---------------------------------------------------------------------------

def kaggle_api() -> object:
    """An authenticated KaggleApi, imported only now because importing the kaggle package authenticates."""
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # the import's own attempt prints help when it fails
            from kaggle.api.kaggle_api_extended import KaggleApi
    except ImportError as e:
        raise DownloadError(missing_package_help(e)) from None
    return authenticate(KaggleApi())


def missing_package_help(e: ImportError) -> str:
    """What to install when importing kaggle failed: kaggle itself, or a module it imports without declaring it."""
    if e.name in (None, "kaggle") or (e.name or "").startswith("kaggle."):
        return f"the kaggle package is missing ({e}); install it: pip install kaggle==2.2.5"
    return (f"the kaggle package is installed but cannot import '{e.name}', which it needs ({e}); "
            f"install the requirements again: pip install -r requirements.txt (or: pip install {e.name})")


def authenticate(api: object) -> object:
    """`api` after api.authenticate(); its failures become one DownloadError line instead of a printed help."""
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            api.authenticate()
    except SystemExit:  # kaggle tried every source it knows, found none usable, printed its help and exit(1)
        config = getattr(api, "config", "~/.kaggle/kaggle.json")  # kaggle.json where kaggle looked for it
        raise DownloadError(
            f"no usable Kaggle API credentials: the kaggle package found no valid token in KAGGLE_API_TOKEN or "
            f"~/.kaggle/access_token, no KAGGLE_USERNAME and KAGGLE_KEY in the environment or in {config}, and "
            f"no `kaggle auth login` session. {TOKEN_HELP}") from None
    except Exception as e:  # e.g. no network while it checks an access token
        raise DownloadError(describe_kaggle_error(e, "checking your Kaggle credentials")) from None
    sys.stdout.write(printed.getvalue())  # keeps its warnings, e.g. a kaggle.json readable by others
    return api


def describe_kaggle_error(error: Exception, action: str) -> str:
    """One line for an exception the kaggle package raised (requests' HTTPError carries the status)."""
    status = getattr(getattr(error, "response", None), "status_code", None)
    if status == 403:
        return (f"{action}: Kaggle answered 403 Forbidden: accept the competition's rules first at {RULES_URL} "
                f"(signed in as the owner of your API token), then rerun")
    if status == 401:
        return f"{action}: Kaggle answered 401 Unauthorized: your API token is invalid or expired. {TOKEN_HELP}"
    if status is not None:
        return f"{action}: Kaggle answered HTTP {status}; try again later"
    detail = utils.one_line(error, limit=120)
    # requests' ConnectionError and Timeout, matched by name: requests comes with kaggle, not with us.
    if any(cls.__name__ in ("ConnectionError", "Timeout") for cls in type(error).__mro__):
        return (f"{action}: cannot reach Kaggle ({type(error).__name__}: {detail}); check your internet "
                f"connection, then rerun (downloads resume)")
    return f"{action}: {type(error).__name__}: {detail}"


# --- zips: reuse, fetch, test -----------------------------------------------------------------

def zip_problem(path: Path) -> str | None:
    """Why `path` is not a sound zip (bad format, bad CRC, empty), or None when it is."""
    try:
        with zipfile.ZipFile(path) as archive:
            if not archive.namelist():
                return "empty archive"
            bad = archive.testzip()
    # Truncated or garbled files fail in several ways depending on where the damage is.
    except (zipfile.BadZipFile, OSError, EOFError, zlib.error, ValueError, NotImplementedError) as e:
        return f"{type(e).__name__}: {e}"
    return f"bad CRC in {bad}" if bad else None


def unwrap_zip(path: Path) -> Path:
    """A zip whose only member is a zip (Kaggle wraps large files, e.g. X.zip.zip) -> that inner zip."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            if len(names) != 1 or not names[0].lower().endswith(".zip"):
                return path
            inner = path.with_name(path.name + ".unwrapped")
            with archive.open(names[0]) as source, open(inner, "wb") as target:
                shutil.copyfileobj(source, target, 1 << 20)
    except zipfile.BadZipFile:
        return path  # not a zip at all: zip_problem reports it
    path.unlink()
    return inner


def delivered_file(staging: Path, zip_name: str) -> Path:
    """The file the kaggle package left in `staging`: it names it after the download URL, not the request."""
    files = [p for p in staging.iterdir() if p.is_file() and not p.name.endswith(KAGGLE_PARTIAL_SUFFIX)]
    for expected in (zip_name, zip_name + ".zip"):
        if staging / expected in files:
            return staging / expected
    if len(files) == 1:
        return files[0]
    found = ", ".join(sorted(p.name for p in files)) or "nothing"
    raise DownloadError(f"downloading {zip_name} left {found} in {staging}; expected one file")


def fetch_zip(api: object, out: Path, zip_name: str) -> Path:
    """Download one competition file into OUT/.zips and return the zip (unwrapped when Kaggle wrapped it)."""
    # One staging folder per file, kept across runs so the kaggle package can resume a partial download.
    staging = out / ZIP_CACHE / f"{zip_name}.part"
    staging.mkdir(parents=True, exist_ok=True)
    print(f"{zip_name}: downloading from Kaggle ({COMPETITION})")
    try:
        api.competition_download_file(COMPETITION, zip_name, path=str(staging), quiet=False)
    except Exception as e:  # the package raises requests' HTTPError, ConnectionError, ValueError...
        raise DownloadError(describe_kaggle_error(e, f"downloading {zip_name}")) from None
    path = out / ZIP_CACHE / zip_name
    unwrap_zip(delivered_file(staging, zip_name)).replace(path)
    shutil.rmtree(staging)
    return path


def obtain_zip(get_api: Callable[[], object], out: Path, zip_name: str) -> Path:
    """A tested zip: one already in OUT/ or OUT/.zips, else downloaded (again, once, if corrupt)."""
    for path in (out / zip_name, out / ZIP_CACHE / zip_name):
        if path.is_file():
            print(f"{zip_name}: testing {path}")
            problem = zip_problem(path)
            if problem is None:
                return path
            print(f"warning: {path} is corrupt ({problem}); deleting it", file=sys.stderr)
            path.unlink()
    for attempt in range(2):
        path = fetch_zip(get_api(), out, zip_name)
        print(f"{zip_name}: testing {path}")
        problem = zip_problem(path)
        if problem is None:
            return path
        path.unlink()
        if attempt == 0:
            print(f"warning: the downloaded {zip_name} is corrupt ({problem}); downloading it again", file=sys.stderr)
    raise DownloadError(f"{zip_name} was corrupt twice in a row ({problem}); check disk space and rerun")


# --- extraction -------------------------------------------------------------------------------

def is_extracted(target: Path, zip_name: str, force: bool = False) -> bool:
    """True when `target` is a finished extraction of `zip_name`; DownloadError when it holds something else."""
    if force or not target.exists():
        return False
    marker = target / COMPLETE_MARKER
    source = marker.read_text(encoding="utf-8").strip() if marker.is_file() else ""
    if source == zip_name:
        return True
    if source:
        raise DownloadError(f"{target} holds the files of {source}, not {zip_name}; rerun with --force to replace them")
    raise DownloadError(f"{target} exists but no finished extraction is recorded in it (unzipped by hand?); "
                        f"remove it, or rerun with --force to replace it")


def extract_zip(zip_path: Path, target: Path, zip_name: str) -> None:
    """Extract into a temporary folder next to `target`, mark it complete, then rename it into place."""
    out = target.parent
    for stale in out.glob(f"{EXTRACT_PREFIX}{target.name}-*"):  # left by a killed run, "-old" included
        shutil.rmtree(stale, ignore_errors=True)
    # Same filesystem as the target, so the final rename is atomic: a run interrupted at any point
    # leaves either no target or a complete one.
    tmp = Path(tempfile.mkdtemp(prefix=f"{EXTRACT_PREFIX}{target.name}-", dir=out))
    try:
        with zipfile.ZipFile(zip_path) as archive:
            members = [m for m in archive.infolist()  # not macOS resource forks, nor hidden files
                       if not (m.filename.startswith("__MACOSX/") or Path(m.filename).name.startswith("."))]
            with tqdm(total=sum(m.file_size for m in members), unit="B", unit_scale=True, unit_divisor=1024,
                      desc=f"extracting {zip_name}") as progress:
                for member in members:
                    archive.extract(member, tmp)
                    progress.update(member.file_size)
        entries = list(tmp.iterdir())
        if not entries:
            raise DownloadError(f"the archive extracted into {tmp} held no files")
        root = entries[0] if len(entries) == 1 and entries[0].is_dir() else tmp  # the zip's top folder, if one
        (root / COMPLETE_MARKER).write_text(zip_name + "\n", encoding="utf-8")
        if target.exists():  # --force: the old folder goes only once the new one is in place
            old = out / f"{EXTRACT_PREFIX}{target.name}-old"
            target.replace(old)
            root.replace(target)
            shutil.rmtree(old)
        else:
            root.replace(target)
    except (OSError, zipfile.BadZipFile) as e:
        raise DownloadError(f"extracting {zip_path} into {target} failed: {e}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# --- the whole download -----------------------------------------------------------------------

def check_download(out: Path, with_test: bool = False) -> list[tuple[Path, Path]]:
    """Check that every photo has its mask and report the counts; returns the pairs."""
    try:
        pairs = find_pairs(out)
    except (FileNotFoundError, ValueError) as e:
        raise DownloadError(str(e)) from None
    if not pairs:
        raise DownloadError(f"no photos found in {out / IMAGE_DIR} after extraction")
    print(f"{len(pairs)} photo/mask pairs in {out}")
    if len(pairs) != CARVANA_TRAIN_PAIRS:
        print(f"warning: the full Carvana train set has {CARVANA_TRAIN_PAIRS} pairs, found {len(pairs)}",
              file=sys.stderr)
    if with_test:
        tests = [p for p in (out / TEST_DIR).iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and not is_hidden(p)]
        print(f"{len(tests)} test photos in {out / TEST_DIR}")
    return pairs


def download_carvana(out: str | Path, hq: bool = False, with_test: bool = False, api: object | None = None,
                     force: bool = False, keep_zips: bool = False) -> list[tuple[Path, Path]]:
    """Download and extract Carvana into OUT/train, OUT/train_masks (and OUT/test); returns the pairs.
    `api` stands in for kaggle's KaggleApi, otherwise imported only when something must be fetched."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    get_api = functools.cache(kaggle_api) if api is None else lambda: api
    parts = [("train_hq.zip" if hq else "train.zip", IMAGE_DIR), ("train_masks.zip", MASK_DIR)]
    if with_test:
        parts.append(("test.zip", TEST_DIR))
    for zip_name, folder in parts:
        target = out / folder
        if is_extracted(target, zip_name, force):
            print(f"{target}: already extracted from {zip_name}, skipping")
            continue
        zip_path = obtain_zip(get_api, out, zip_name)
        print(f"{zip_name}: extracting into {target}")
        extract_zip(zip_path, target, zip_name)
        if zip_path.parent == out / ZIP_CACHE and not keep_zips:
            zip_path.unlink()  # only our own downloads: a zip the user put in OUT/ stays
    with contextlib.suppress(OSError):
        (out / ZIP_CACHE).rmdir()  # only when empty
    return check_download(out, with_test)


# --- command line -----------------------------------------------------------------------------

def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """download.py's command line."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="data/carvana", metavar="DIR",
                        help="folder to extract into (default: %(default)s)")
    parser.add_argument("--hq", action="store_true", help="download train_hq.zip instead of train.zip")
    parser.add_argument("--with-test", action="store_true", help="also download test.zip (8 GB)")
    parser.add_argument("--force", action="store_true", help="extract complete folders again (valid zips are reused)")
    parser.add_argument("--keep-zips", action="store_true",
                        help=f"keep the downloaded zips in DIR/{ZIP_CACHE} after extraction")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None, api: object | None = None) -> int:
    """Download and extract; `api` replaces the Kaggle API in tests. Exit status 1 on errors, 130 when interrupted."""
    args = parse_args(argv)
    try:
        download_carvana(args.out, hq=args.hq, with_test=args.with_test, api=api,
                         force=args.force, keep_zips=args.keep_zips)
    except (UserError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted; rerun the same command to continue (finished parts are kept)", file=sys.stderr)
        return 130
    print(f"Done. Train with:\n    python train.py --data-dir {shlex.quote(str(args.out))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
