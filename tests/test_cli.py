import os
import subprocess
import sys

import pytest
from conftest import make_backbone

from keras_gemma import GemmaCausalLM
from keras_gemma import GemmaCausalLMPreprocessor
from keras_gemma.cli import main


@pytest.fixture(scope="module")
def preset_dir(tmp_path_factory, tokenizer):
    lm = GemmaCausalLM(make_backbone("mqa", seed=1), GemmaCausalLMPreprocessor(tokenizer, 32))
    directory = tmp_path_factory.mktemp("cli") / "tiny"
    lm.save_to_preset(directory)
    return directory, lm


def test_generate_prints_the_models_text(preset_dir, capsys):
    directory, lm = preset_dir
    assert main(["generate", "--preset", str(directory), "The", "A", "--max-length", "12"]) == 0
    lm.compile(sampler="greedy")
    # One line per prompt (not `splitlines`: an untrained model's text may
    # hold control characters such as "\x1d" that it splits on).
    expected = lm.generate(["The", "A"], max_length=12)
    assert capsys.readouterr().out == "".join(f"{text}\n" for text in expected)


def test_generate_streams(preset_dir, capsys):
    directory, lm = preset_dir
    args = ["generate", "--preset", str(directory), "The", "--max-length", "12", "--stream"]
    assert main(args) == 0
    lm.compile(sampler="greedy")
    assert capsys.readouterr().out == lm.generate("The", max_length=12, strip_prompt=True) + "\n"


def test_chat_reads_turns_until_eof(preset_dir, capsys, monkeypatch):
    directory, _ = preset_dir
    lines = iter(["Hi", "/reset", "Bye"])

    def fake_input(prompt):
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    monkeypatch.setattr("builtins.input", fake_input)
    assert main(["chat", "--preset", str(directory), "--max-length", "24"]) == 0
    assert "Chatting" in capsys.readouterr().err


def test_convert_to_huggingface_and_back(preset_dir, tmp_path):
    directory, _ = preset_dir
    assert main(["convert", str(directory), str(tmp_path / "hf"), "--to", "huggingface"]) == 0
    assert (tmp_path / "hf" / "model.safetensors").exists()
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "keras"), "--to", "keras"]) == 0
    assert (tmp_path / "keras" / "model.weights.h5").exists()


def test_clear_errors(preset_dir, capsys):
    assert main(["generate", "--preset", "gemma_2b_enn", "Hi"]) == 1
    assert "Did you mean 'gemma_2b_en'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["generate", "--preset", "x", "Hi", "--top-p", "2"])
    assert "must be in (0, 1]" in capsys.readouterr().err
    directory, _ = preset_dir
    assert main(["generate", "--preset", str(directory), "A", "B", "--stream"]) == 1
    assert "exactly one prompt" in capsys.readouterr().err


def test_backend_flag_re_executes_on_that_backend(tmp_path):
    """`--backend` lists presets from a process on that backend: the child
    (after `os.execve`) runs on the requested backend. A `sitecustomize`
    reports Keras's backend when a process exits normally,
    which the replaced parent never does."""
    (tmp_path / "sitecustomize.py").write_text(
        "import atexit, sys\n"
        "def _report():\n"
        "    if 'keras' in sys.modules:\n"
        "        import keras\n"
        "        print('BACKEND=' + keras.config.backend(), file=sys.stderr)\n"
        "atexit.register(_report)\n"
    )
    other = {"jax": "torch", "torch": "tensorflow", "tensorflow": "jax"}
    current = os.environ.get("KERAS_BACKEND", "tensorflow")
    pythonpath = os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, KERAS_BACKEND=current, PYTHONPATH=pythonpath)
    script = "from keras_gemma.cli import main; raise SystemExit(main())"
    result = subprocess.run(
        [sys.executable, "-c", script, "presets", "--backend", other[current]],
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
    )
    assert result.returncode == 0, result.stderr
    assert "gemma_2b_en" in result.stdout and "code_gemma_7b_en" in result.stdout
    reports = [line for line in result.stderr.splitlines() if line.startswith("BACKEND=")]
    assert reports == [f"BACKEND={other[current]}"], result.stderr


def test_converted_files_hold_the_same_values(preset_dir, tmp_path):
    import numpy as np
    from helpers import to_numpy
    from safetensors.numpy import load_file

    from keras_gemma.weight_names import huggingface_tensors

    directory, lm = preset_dir
    assert main(["convert", str(directory), str(tmp_path / "hf"), "--to", "huggingface"]) == 0
    tensors = load_file(tmp_path / "hf" / "model.safetensors")
    weights = {v.path: to_numpy(v) for v in lm.backbone.weights}
    mapping = huggingface_tensors(lm.backbone.config)
    assert set(weights) == set(mapping)
    for path, (name, to_hf, _) in mapping.items():
        np.testing.assert_array_equal(tensors[name], to_hf(weights[path]), err_msg=path)
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "keras"), "--to", "keras"]) == 0
    back = GemmaCausalLM.from_preset(str(tmp_path / "keras"))
    assert {v.path for v in back.backbone.weights} == set(weights)
    for v in back.backbone.weights:
        np.testing.assert_array_equal(to_numpy(v), weights[v.path], err_msg=v.path)


def _chat_prompts(preset_dir, monkeypatch, capsys, typed):
    """Runs `keras-gemma chat` on `typed` as standard input; returns the
    prompts the model was given and what was printed. The model always
    replies "Hello" (an untrained one would fill the length, and the history
    would never fit the next prompt)."""
    import io

    directory, _ = preset_dir
    prompts = []

    def spy(self, prompt, *args, **kwargs):
        prompts.append(prompt)
        return iter(["Hel", "lo"])

    monkeypatch.setattr(GemmaCausalLM, "generate_stream", spy)
    monkeypatch.setattr("sys.stdin", io.StringIO(typed))
    assert main(["chat", "--preset", str(directory), "--max-length", "64"]) == 0
    return prompts, capsys.readouterr()


def test_chat_reset_clears_the_history_and_quit_leaves(preset_dir, monkeypatch, capsys):
    from keras_gemma import format_turns

    # Without /reset the second prompt carries the first exchange ...
    prompts, _ = _chat_prompts(preset_dir, monkeypatch, capsys, "Hi\nBye\n")
    assert prompts[1] == format_turns([("user", "Hi"), ("model", "Hello"), ("user", "Bye")])
    # ... with it, the second prompt is the new message alone; /quit stops
    # reading (the message after it is never sent) and exits cleanly.
    typed = "Hi\n/reset\nBye\n/quit\nNo\n"
    prompts, printed = _chat_prompts(preset_dir, monkeypatch, capsys, typed)
    assert prompts == [format_turns([("user", "Hi")]), format_turns([("user", "Bye")])]
    # Four "> " prompts (Hi, /reset, Bye, /quit: nothing read after /quit),
    # a line per reply and none for the commands.
    assert printed.out == "> Hello\n> > Hello\n> "
    assert "Chatting" in printed.err


def test_model_flags_reach_the_loaded_model(preset_dir):
    from keras_gemma import BeamSampler
    from keras_gemma import TopKSampler
    from keras_gemma import TopPSampler
    from keras_gemma.cli import _load
    from keras_gemma.cli import _parser

    directory, _ = preset_dir

    def load(*flags):
        return _load(_parser().parse_args(["generate", "--preset", str(directory), "x", *flags]))

    lm = load("--dtype", "bfloat16", "--sampler", "top_k", "--top-k", "3", "--temperature", "0.5")
    assert lm.backbone.dtype_policy.variable_dtype == "bfloat16"
    assert {v.dtype for v in lm.backbone.weights} == {"bfloat16"}
    assert isinstance(lm.sampler, TopKSampler)
    assert (lm.sampler.k, lm.sampler.temperature, lm.sampler.seed) == (3, 0.5, None)
    lm = load("--sampler", "top_p", "--top-p", "0.7", "--seed", "9", "--quantize", "int8")
    assert isinstance(lm.sampler, TopPSampler) and (lm.sampler.p, lm.sampler.seed) == (0.7, 9)
    assert lm.backbone.get_config().get("quantization_mode") == "int8"
    assert any(v.dtype == "int8" for v in lm.backbone.weights)
    lm = load("--sampler", "beam", "--num-beams", "2")
    assert isinstance(lm.sampler, BeamSampler) and lm.sampler.num_beams == 2


def test_seed_flag_makes_sampling_reproducible(preset_dir, capsys):
    directory, _ = preset_dir

    def sample(seed):
        args = ["generate", "--preset", str(directory), "The", "--max-length", "16"]
        assert main([*args, "--sampler", "random", "--temperature", "2", "--seed", seed]) == 0
        return capsys.readouterr().out

    first = sample("1")
    assert sample("1") == first
    assert sample("2") != first
