"""Packaging: the install adds only the `xkd` namespace to site-packages, and one lock pins the torch stack."""

from __future__ import annotations

import configparser
import re
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _requirement_name(line: str) -> str:
    return re.split(r"[\[<>=!~; ]", line.strip(), maxsplit=1)[0].lower().replace("_", "-")


def test_wheel_installs_only_the_xkd_namespace(tmp_path: Path) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
    )
    (wheel,) = tmp_path.glob("xkd-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/", 1)[0] for n in names}
    assert {t for t in top if not t.endswith(".dist-info")} == {"xkd"}
    for part in ("model", "pipeline", "sharding"):
        assert any(n.startswith(f"xkd/{part}/") for n in names), part
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "xkd-shard = xkd.sharding.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_constraints_pin_the_torch_stack_and_every_dependency() -> None:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, version = line.split("==")
            pins[name.lower().replace("_", "-")] = version
    assert (pins["torch"], pins["torchaudio"], pins["torchvision"]) == ("2.11.0", "2.11.0", "0.26.0")
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    declared = cfg["options"]["install_requires"].split("\n")
    for extra in ("dev", "dali"):
        declared += cfg["options.extras_require"][extra].split("\n")
    unpinned = [_requirement_name(d) for d in declared if d.strip() and _requirement_name(d) not in pins]
    assert not unpinned, f"declared but not pinned in constraints.txt: {unpinned}"
