import textwrap

import pytest

from lowbit.nn import BitLinear, QuantRule
from lowbit.train import TrainConfig, load_config
from lowbit.train.data import batch_at, encode


def _write(tmp_path, text):
    path = tmp_path / "run.toml"
    path.write_text(textwrap.dedent(text))
    return path


def test_a_full_toml_config_parses(tmp_path):
    path = _write(tmp_path, r"""
        [model]
        d_model = 64
        n_layers = 2
        n_heads = 2
        [data]
        tokenizer = "byte"
        corpus = "pydoc"
        [train]
        steps = 20
        lr = 3e-3
        batch_size = 8
        seq_len = 32
        seed = 7
        eval_interval = 10
        checkpoint_dir = "ckpt"
        [[quant.rules]]
        path = 'layers\.\d+\.attn\..*'
        layer = "bitlinear"
        [[quant.rules]]
        path = 'layers\.\d+\.mlp\..*'
        weight_spec = "int4:channel"
        estimator = "lsq"
        """)
    config = load_config(path)
    assert config.train.lr == 3e-3 and config.train.seed == 7 and config.model.d_model == 64
    rules = config.quant.quant_rules()
    assert rules[0].layer is BitLinear and str(rules[1].weight_spec) == "int4:channel"
    llama = config.model.llama_config(config.data.vocab_size, config.train.seq_len)
    assert llama.vocab_size == 256 and llama.ffn_dim == 192 and llama.head_dim == 32
    assert TrainConfig.from_dict(config.to_dict()) == config


@pytest.mark.parametrize("text, message", [
    ("[train]\nlrate = 0.1\n", r"unknown config key\(s\) \['train.lrate'\]"),
    ("[optim]\nlr = 0.1\n", r"unknown config section\(s\) \['optim'\]"),
    ("[[quant.rules]]\npath = '.*'\nweight_spec = 'int4'\nbits = 4\n",
     r"quant.rules\[0\]: unknown rule key\(s\) \['bits'\]"),
    ("[data]\ntokenizer = 'gpt2'\n", "data.tokenizer must be one of"),
    ("[train]\nsteps = 0\n", "train.steps must be int >= 1"),
    ("[train]\nsteps = 10\nwarmup_steps = 10\n", "warmup_steps"),
    ("[quant]\npreset = 'int3'\n", "quant.preset must be one of"),
    ("[[quant.rules]]\npath = '(('\nweight_spec = 'int4'\n", "not a valid regex"),
    ("[model]\nd_model = 30\nn_heads = 4\n", "multiple of model.n_heads"),
    ("[train]\nlr = nan\n", "train.lr must be a finite number.*got nan"),
    ("[train]\nlr = inf\n", "train.lr must be a finite number.*got inf"),
    ("[train]\nlr = 0\n", "train.lr must be a finite number > 0"),
    ("[train]\nb1 = 1.5\n", r"train.b1 must be a number in \[0, 1\), got 1.5"),
    ("[train]\nb2 = 1.0\n", r"train.b2 must be a number in \[0, 1\)"),
    ("[train]\nmin_lr_ratio = 2.0\n", r"train.min_lr_ratio must be a number in \[0, 1\]"),
    ("[train]\nweight_decay = -inf\n", "train.weight_decay must be"),
    ("[train]\ngrad_clip = inf\n", "train.grad_clip must be a finite number"),
    ("[model]\nrope_base = nan\n", "model.rope_base must be"),
])
def test_bad_configs_raise_value_errors_naming_the_key(tmp_path, text, message):
    with pytest.raises(ValueError, match=message):
        load_config(_write(tmp_path, text))


def test_missing_file_and_bad_toml(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_config(tmp_path / "absent.toml")
    with pytest.raises(ValueError, match="not valid TOML"):
        load_config(_write(tmp_path, "[train\nsteps=1"))


def test_batches_depend_only_on_seed_and_step_and_tokenizers_encode():
    tokens = encode("hello, world. " * 50, "byte")
    assert tokens.max() < 256 and tokens.size == 700
    a, b = batch_at(tokens, 5, 4, 16, 0), batch_at(tokens, 5, 4, 16, 0)
    assert (a == b).all() and a.shape == (4, 16)
    assert not (batch_at(tokens, 6, 4, 16, 0) == a).all()
    assert QuantRule.from_dict({"path": ".*", "layer": "binary"}).layer.__name__ == "BinaryLinear"


def test_the_committed_experiment_configs_parse():
    from pathlib import Path

    paths = sorted((Path(__file__).resolve().parents[2] / "experiments" / "qat").glob("*.toml"))
    assert paths
    for path in paths:
        config = load_config(path)
        assert config.quant.quant_rules() or config.quant.preset == "fp32"


@pytest.mark.model
def test_the_smollm2_tokenizer_feeds_training_data():
    from lowbit.train.data import corpus_tokens

    train, held_out = corpus_tokens("pydoc", "smollm2", 0.1)
    assert 90_000 < train.size + held_out.size < 130_000  # about 113K SmolLM2 tokens
    assert train.max() < 49152 and held_out.size == pytest.approx(0.1 * (train.size + held_out.size), abs=1)
    assert (encode("def f(x): return 1", "smollm2") == encode("def f(x): return 1", "smollm2")).all()
