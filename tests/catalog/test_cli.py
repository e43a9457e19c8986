"""`mint revision|alias|gc` through typer's CliRunner on a catalog under a tmp MINT_HOME."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from mint.catalog import Catalog
from mint.catalog.peft_io import CONFIG_FILE, WEIGHTS_FILE
from mint.cli import app
from mint.errors import InvalidAdapter, NotFound
from mint.models.base import ResidentBase
from mint.models.lora import LoraSignature

SIGNATURE = LoraSignature(rank=2, alpha=4.0, target_modules=("q_proj", "v_proj"))
runner = CliRunner()


@pytest.fixture
def home(
    tmp_path: Path, bases_dir: Path, tiny_base: ResidentBase, monkeypatch: pytest.MonkeyPatch
) -> Path:
    home = tmp_path / "home"
    home.mkdir()
    (home / "bases").symlink_to(bases_dir, target_is_directory=True)
    for name, value in (("MINT_HOME", str(home)), ("MINT_DEVICE", "cpu"),
                        ("MINT_DTYPE", "float32")):  # fmt: skip
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("MINT_CATALOG_URL", raising=False)
    catalog = Catalog(f"sqlite:///{home / 'catalog.db'}", home / "blobs")
    catalog.ensure_tenant("default")
    catalog.record_base(tiny_base.base_id, tiny_base.fingerprint)
    catalog.create_policy("default", "pol", tiny_base.base_id, tiny_base.fingerprint, SIGNATURE)
    for seed in (1, 2):
        generator = torch.Generator().manual_seed(seed)
        tensors = {
            path: (torch.randn(a, generator=generator), torch.randn(b, generator=generator))
            for path, (a, b) in tiny_base.shapes(SIGNATURE).items()
        }
        catalog.export_revision("default", "pol", None, tensors, seed)
    catalog.close()
    return home


def invoke(*args: str) -> str:
    result = runner.invoke(app, list(args))
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    assert result.exit_code == 0, result.output
    return result.stdout


def reopen(home: Path) -> Catalog:
    return Catalog(f"sqlite:///{home / 'catalog.db'}", home / "blobs")


def test_show_list_export_import_and_delete(home: Path, tmp_path: Path) -> None:
    listing = invoke("revision", "list", "pol")
    assert "rev-1" in listing and "rev-2" in listing
    shown = invoke("revision", "show", "pol").splitlines()
    assert shown[0] == "revision 2 (rev-2) of policy pol"
    assert shown[3] == "rank 2, alpha 4, targets q_proj,v_proj"
    assert shown[5] == "aliases latest"
    out = tmp_path / "out"
    assert invoke("revision", "export", "pol", str(out), "--ref", "1").strip() == (
        f"revision 1 of pol -> {out}"
    )
    assert sorted(p.name for p in out.iterdir()) == [
        CONFIG_FILE,
        WEIGHTS_FILE,
        "mint_revision.json",
    ]
    imported = invoke("revision", "import", str(out), "--policy", "pol", "--name", "back")
    assert imported.startswith(f"imported {out} as revision 3 (back) of pol")
    assert invoke("revision", "delete", "pol", "2").strip() == "revision 2 (rev-2) of pol deleted"
    catalog = reopen(home)
    try:
        revisions, _ = catalog.list_revisions("default", "pol")
        assert [(r.number, r.name) for r in revisions] == [(1, "rev-1"), (3, "back")]
        assert revisions[0].sha256 == revisions[1].sha256  # same bytes, one blob
    finally:
        catalog.close()


def test_alias_set_and_delete(home: Path) -> None:
    assert invoke("alias", "set", "pol", "prod", "1").strip() == "pol: prod -> revision 1"
    catalog = reopen(home)
    assert catalog.aliases("default", "pol") == {"latest": 2, "prod": 1}
    assert invoke("alias", "delete", "pol", "prod").strip() == "pol: alias prod deleted"
    assert catalog.aliases("default", "pol") == {"latest": 2}
    catalog.close()


def test_gc_respects_the_grace_period(home: Path) -> None:
    invoke("revision", "delete", "pol", "1")
    kept = invoke("gc").strip()
    assert kept.startswith("expired: 0 training states, 0 revisions (0 kept by aliases); "
                           "deleted 0 blobs and 0 staging entries")  # fmt: skip
    swept = invoke("gc", "--grace-s", "0").strip()
    assert "deleted 1 blobs and 0 staging entries" in swept


def test_errors_name_the_problem(home: Path, tmp_path: Path) -> None:
    with pytest.raises(NotFound, match="policy 'pol' not found"):
        invoke("revision", "show", "pol", "--tenant", "someone-else")
    out = tmp_path / "bad"
    invoke("revision", "export", "pol", str(out))
    config = json.loads((out / CONFIG_FILE).read_text())
    (out / CONFIG_FILE).write_text(json.dumps(config | {"r": 8, "use_dora": True}))
    with pytest.raises(InvalidAdapter) as caught:
        invoke("revision", "import", str(out), "--policy", "pol")
    assert caught.value.problems[:2] == [
        "rank r=8 differs from policy 'pol''s rank 2; import it into a policy with that rank",
        "use_dora is True; DoRA magnitudes are not served; retrain with plain LoRA",
    ]
