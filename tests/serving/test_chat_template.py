"""A model's chat template (``tokenizer_config.json``): rendered as transformers renders it for
vLLM, used by the mock and the router for chat prompts; bad templates are clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvferry.errors import ConfigError
from kvferry.serving.mock.tokenizer import HfTokenizer, render_chat
from kvferry.testing.mock_engine import MockServerProcess

tokenizers = pytest.importorskip("tokenizers")
pytest.importorskip("jinja2")

# Whitespace that trim_blocks/lstrip_blocks remove, a loop, raise_exception, the special tokens.
TEMPLATE = """{{ bos_token }}
{% for message in messages %}
    {% if message['role'] not in ['system', 'user', 'assistant'] %}
        {{ raise_exception('unknown role ' + message['role']) }}
    {% endif %}
<|{{ message['role'] }}|>
{{ message['content'] | trim }}{{ eos_token if message['role'] == 'assistant' else '' }}
{% endfor %}
{% if add_generation_prompt %}
<|assistant|>
{% endif %}"""

WORDS = ["[UNK]", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>", "hello", "world",
         "the", "sea", "is", "calm", "what", "colour", "blue", "be", "brief", "?", "."]  # fmt: skip


def _tokenizer_dir(tmp_path: Path, template: object = TEMPLATE) -> Path:
    tok = tokenizers.Tokenizer(
        tokenizers.models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]")
    )
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(["<s>", "</s>", "[UNK]"])  # as a real tokenizer.json lists them
    tok.save(str(tmp_path / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": {"content": "<s>", "__type": "AddedToken"},
        "eos_token": "</s>",
        "unk_token": "[UNK]",
        "chat_template": template,
    }
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    return tmp_path


MESSAGES = [
    {"role": "developer", "content": "be brief ."},  # vLLM reads developer as system
    {"role": "user", "content": [{"type": "text", "text": t} for t in ("hello", "world")]},
    {"role": "assistant", "content": "the sea is calm ."},
    {"role": "user", "content": "what colour is the sea ?"},
]  # fmt: skip


def test_chat_ids_are_what_transformers_renders_for_vllm(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    directory = _tokenizer_dir(tmp_path)
    ours = HfTokenizer(directory)
    assert ours.chat_template is not None
    text = ours.chat_template.render(MESSAGES)
    # What vLLM hands transformers: developer -> system, text parts joined by newlines.
    as_vllm = [
        {"role": "system", "content": "be brief ."},
        {"role": "user", "content": "hello\nworld"},
        {"role": "assistant", "content": "the sea is calm ."},
        {"role": "user", "content": "what colour is the sea ?"},
    ]
    hf = transformers.AutoTokenizer.from_pretrained(str(directory))
    expected = hf.apply_chat_template(as_vllm, tokenize=False, add_generation_prompt=True)
    assert text == expected
    assert text.startswith("<s>\n<|system|>\nbe brief .\n<|user|>\nhello\nworld\n")
    assert ours.chat_ids(MESSAGES) == hf.encode(expected, add_special_tokens=False)
    assert ours.chat_ids(MESSAGES)[-1] == WORDS.index("<|assistant|>")


def test_without_a_template_the_fixed_one_is_used(tmp_path: Path) -> None:
    directory = _tokenizer_dir(tmp_path)
    (directory / "tokenizer_config.json").unlink()
    tok = HfTokenizer(directory)
    assert tok.chat_template is None
    assert tok.chat_ids(MESSAGES[3:]) == tok.encode(render_chat(MESSAGES[3:]))


@pytest.mark.parametrize(
    ("template", "fragment"),
    [
        ("{% for m in messages %}", "chat template does not compile"),
        (42, "chat_template must be a string"),
    ],
)
def test_bad_templates_fail_at_load(tmp_path: Path, template: object, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        HfTokenizer(_tokenizer_dir(tmp_path, template))


def test_a_template_that_trips_over_a_message_is_refused_not_a_crash(tmp_path: Path) -> None:
    tok = HfTokenizer(_tokenizer_dir(tmp_path, "{{ messages[0]['content'] + 1 }}"))
    with pytest.raises(ValueError, match="chat template refused"):
        tok.chat_ids(MESSAGES)


def test_unreadable_tokenizer_config_is_a_clear_error(tmp_path: Path) -> None:
    directory = _tokenizer_dir(tmp_path)
    (directory / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not a readable JSON tokenizer config"):
        HfTokenizer(directory)


def test_named_templates_use_the_default_one(tmp_path: Path) -> None:
    named = [
        {"name": "tool_use", "template": "{{ 'tools' }}"},
        {"name": "default", "template": TEMPLATE},
    ]
    tok = HfTokenizer(_tokenizer_dir(tmp_path, named))
    assert tok.chat_template is not None
    assert tok.chat_template.render(MESSAGES[3:]).startswith("<s>\n<|user|>\n")


def test_the_mock_serves_chat_with_the_models_template(tmp_path: Path) -> None:
    directory = _tokenizer_dir(tmp_path)
    with MockServerProcess.start("--tokenizer", str(directory)) as s:
        reply = s.post("/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 2})
        assert reply.status == 200, reply.body
        assert reply.body["usage"]["prompt_tokens"] == len(
            HfTokenizer(directory).chat_ids(MESSAGES)
        )
        refused = s.post(
            "/v1/chat/completions",
            {"messages": [{"role": "tool", "content": "x"}], "max_tokens": 2},
        )
        assert refused.status == 400
        assert "unknown role tool" in refused.body["error"]["message"]


def test_a_chat_template_jinja_file_wins_as_in_transformers(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    directory = _tokenizer_dir(tmp_path)
    (directory / "chat_template.jinja").write_text(
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }} {% endfor %}"
    )
    ours = HfTokenizer(directory)
    assert ours.chat_template is not None
    hf = transformers.AutoTokenizer.from_pretrained(str(directory))
    as_vllm = [{"role": "user", "content": "what colour is the sea ?"}]
    expected = hf.apply_chat_template(as_vllm, tokenize=False, add_generation_prompt=True)
    assert ours.chat_template.render(MESSAGES[3:]) == expected == "user: what colour is the sea ? "
