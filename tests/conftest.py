from __future__ import annotations

from pathlib import Path

import pytest
import torch

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.tiny import train_tokenizer

    d = tmp_path_factory.mktemp("tok")
    train_tokenizer(d)
    return d
