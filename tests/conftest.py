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


@pytest.fixture(scope="session")
def golden_ref():
    """tokens(prompt, n, temperature=0, seed=0, top_k=0): the golden model's generation for a text
    prompt (the shipped tokenizer, BOS first) or a list of ids; tokens.tok is the tokenizer."""
    from bakedllama.golden import Golden, generate
    from bakedllama.model import DEFAULT_BAKED, DEFAULT_TOKENIZER, load_baked
    from bakedllama.tokenizer import Tokenizer

    m = load_baked(DEFAULT_BAKED)
    tok = Tokenizer.load(DEFAULT_TOKENIZER, m.meta["tokenizer_sha256"])
    g = Golden(m)

    def tokens(prompt, n, temperature=0.0, seed=0, top_k=0):
        ids = prompt if isinstance(prompt, list) else tok.encode(prompt)
        return list(generate(g, ids, n, temperature, seed, top_k))

    tokens.tok = tok
    return tokens
