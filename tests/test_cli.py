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


def test_module_entry_point_lists_presets_on_the_chosen_backend():
    other = {"jax": "torch", "torch": "tensorflow", "tensorflow": "jax"}
    backend = other[os.environ.get("KERAS_BACKEND", "tensorflow")]
    result = subprocess.run(
        [sys.executable, "-m", "keras_gemma", "presets", "--backend", backend],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "gemma_2b_en" in result.stdout and "code_gemma_7b_en" in result.stdout
