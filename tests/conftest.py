import os
from pathlib import Path

import pytest

from tests.fixtures import write_raw

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    """A randomly initialised 2-layer Llama with the real Llama-3 tokenizer and Llama-3.2 template."""
    from utils.models.tiny import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("tiny") / "tiny-llama")


@pytest.fixture
def raw_dir(tmp_path) -> Path:
    """Fixture files in all eleven raw shapes."""
    return write_raw(tmp_path / "raw")


@pytest.fixture(scope="session")
def real_raw_dir() -> Path:
    """The five real files: data/raw, $ECG_RAW_DIR, or ../shared beside the checkout (CI has it)."""
    for cand in (os.environ.get("ECG_RAW_DIR"), ROOT / "data/raw/ECG-Expert-QA", ROOT.parent / "shared/ECG-Expert-QA"):
        if cand and Path(cand, "Patient's right to know.json").is_file():
            return Path(cand)
    pytest.skip("the real ECG-Expert-QA files are not here (set ECG_RAW_DIR)")


@pytest.fixture
def processed(tmp_path, raw_dir) -> Path:
    """data/processed written from the fixture files, without the tokenizer step."""
    from utils.core.config import load_config
    from utils.data.prepare import PrepareConfig, run_prepare

    cfg = load_config(PrepareConfig, None, {"raw_dir": str(raw_dir), "out_dir": str(tmp_path / "processed"),
                                            "system_prompt_file": str(ROOT / "data/system_prompt.txt"),
                                            "tokenizer": "", "val_fraction": 0.1, "test_fraction": 0.1})
    run_prepare(cfg)
    return tmp_path / "processed"
