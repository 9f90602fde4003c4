"""No package-index host is named anywhere in the repository: where packages come from is the
user's choice (pip's configuration, ``TORCH_INDEX_URL``, uv), never a URL baked into a script, a doc
or a test. The host names are written as patterns here, so this file does not name them either."""

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
INDEX_HOSTS = re.compile(
    r"\b(?:"
    r"(?:test\.)?pypi\.org|pypi\.python\.org|files\.pythonhosted\.org|download\.pytorch\.org"
    r"|pypi\.(?:ngc\.)?nvidia\.com|(?:conda|repo)\.anaconda\.(?:org|com)|anaconda\.org"
    r")\b",
    re.IGNORECASE,
)


def tracked_text_files() -> list[Path]:
    try:
        out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                             capture_output=True, check=True, timeout=30).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"not a git checkout ({exc}): cannot list the repository's files")
    return [ROOT / name for name in out.decode().split("\0") if name and (ROOT / name).is_file()]


def test_the_pattern_catches_every_index_host_it_names():
    for host in ("pypi" + ".org/simple", "files." + "pythonhosted.org", "download." + "pytorch.org/whl/cpu",
                 "pypi." + "nvidia.com", "conda.anaconda" + ".org"):
        assert INDEX_HOSTS.search(f"--index-url https://{host}"), host
    assert not INDEX_HOSTS.search("PyPI's default build; PyTorch's CPU wheel index")


def test_no_file_of_the_repository_names_a_package_index_host():
    found = []
    for path in tracked_text_files():
        try:
            text = path.read_text(errors="strict")
        except (UnicodeDecodeError, OSError):
            continue  # binary (snapshots are SVG text and are read; PNGs are not)
        for number, line in enumerate(text.splitlines(), 1):
            if INDEX_HOSTS.search(line):
                found.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert found == []
