import pytest


@pytest.fixture(scope="session")
def small_cfg():
    from bakedllama.config import ModelConfig

    return ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=48, vocab_size=64,
                       seq_len=32, tied_embeddings=False)


@pytest.fixture(scope="session")
def small_baked(tmp_path_factory, small_cfg):
    from bakedllama.synthetic import random_baked

    return random_baked(tmp_path_factory.mktemp("m") / "small.bkl", small_cfg, "w8", seed=3)
