"""Tool calls in the models' own formats: parsed from text, forced by a grammar, rendered in history."""

from __future__ import annotations

import json

import jsonschema
import pytest
from dsnode.inference.grammar import Constraint, lark_grammar
from dsnode.inference.toolformats import (
    DeepSeekFormat,
    HermesFormat,
    ToolCall,
    ToolSpec,
    format_for_template,
    template_renders_tools,
)

from tests.daemon.grammar_support import generate, small_tokenizer

DS = DeepSeekFormat
DEEPSEEK_MARKERS = [DS.start, DS.end, DS.call_begin, DS.call_end, DS.sep, "<｜User｜>", "<｜Assistant｜>"]
# A template in the shape of DeepSeek-R1's: no tool list, calls in history in DeepSeek's format, and the
# generation prompt opens <think>.
DEEPSEEK_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ m['content'] }}"
    "{% elif m['role'] == 'user' %}{{ '<｜User｜>' + m['content'] }}"
    "{% elif m['role'] == 'assistant' and m['tool_calls'] %}{{ '<｜Assistant｜><｜tool▁calls▁begin｜>' }}"
    "{% for t in m['tool_calls'] %}{{ '<｜tool▁call▁begin｜>' + t['type'] + '<｜tool▁sep｜>' + t['function']['name']"
    " + '\\n```json\\n' + t['function']['arguments'] + '\\n```<｜tool▁call▁end｜>' }}{% endfor %}"
    "{{ '<｜tool▁calls▁end｜>' }}"
    "{% elif m['role'] == 'assistant' %}{{ '<｜Assistant｜>' + m['content'] }}"
    "{% elif m['role'] == 'tool' %}{{ '<｜tool▁outputs▁begin｜>' + m['content'] + '<｜tool▁outputs▁end｜>' }}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<｜Assistant｜><think>\\n' }}{% endif %}"
)
WEATHER = ToolSpec("get_weather", "The weather", {"type": "object", "properties": {"city": {"type": "string"},
                                                                                  "days": {"type": "integer"}},
                                                   "required": ["city", "days"], "additionalProperties": False})
TIME = ToolSpec("get_time", "The time", {"type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}},
                                         "required": ["zone"]})


def test_hermes_calls_are_parsed_with_the_text_before_them():
    text = 'Let me look.<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n' \
           '<tool_call>\n{"name": "get_time", "arguments": "{\\"zone\\": \\"UTC\\"}"}\n</tool_call>'
    assert HermesFormat().parse(text) == ("Let me look.", [ToolCall("get_weather", '{"city": "Paris"}'),
                                                         ToolCall("get_time", '{"zone": "UTC"}')])
    assert HermesFormat().parse("no call here") == ("no call here", [])


@pytest.mark.parametrize("text", [
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Par',  # cut
    '<tool_call>\n{"name": "get_weather", "arguments": [1]}\n</tool_call>',  # arguments not an object
    '<tool_call>\n{"arguments": {}}\n</tool_call>',  # no name
    '<tool_call>\n{"name": "f", "arguments": {}}\n</tool_call> and then some text',
])
def test_malformed_hermes_calls_are_none(text):
    assert HermesFormat().parse(text) is None


def test_deepseek_calls_are_parsed():
    text = (f"Checking.{DS.start}{DS.call_begin}function{DS.sep}get_weather\n```json\n"
            f'{{"city": "Paris", "days": 2}}\n```{DS.call_end}\n{DS.call_begin}function{DS.sep}get_time\n```json\n'
            f'{{"zone": "UTC"}}\n```{DS.call_end}{DS.end}')
    assert DeepSeekFormat().parse(text) == ("Checking.", [ToolCall("get_weather", '{"city": "Paris", "days": 2}'),
                                                         ToolCall("get_time", '{"zone": "UTC"}')])
    assert DeepSeekFormat().parse(text[:-len(DS.end)]) is None  # never closed
    broken = text.replace('{"zone": "UTC"}', '{"zone": ')
    assert DeepSeekFormat().parse(broken) is None


def test_the_template_says_which_format_and_whether_it_lists_tools():
    from dsnode.central.bundled.tokenizer import CHAT_TEMPLATE

    assert isinstance(format_for_template(DEEPSEEK_TEMPLATE), DeepSeekFormat)
    assert isinstance(format_for_template(CHAT_TEMPLATE), HermesFormat)
    assert isinstance(format_for_template(None), HermesFormat)
    assert template_renders_tools(CHAT_TEMPLATE) and not template_renders_tools(DEEPSEEK_TEMPLATE)


@pytest.mark.parametrize("form, template, markers", [
    (HermesFormat(), None, None),
    (DeepSeekFormat(), DEEPSEEK_TEMPLATE, DEEPSEEK_MARKERS),
], ids=["hermes", "deepseek"])
@pytest.mark.parametrize("seed", range(6))
def test_forced_calls_parse_and_their_arguments_validate(form, template, markers, seed):
    """Random logits under the format's grammar: always a well-formed call of an offered tool."""
    tokenizer = small_tokenizer(template or small_tokenizer().chat_template, markers)
    tools = [WEATHER, TIME]
    grammar = lark_grammar(form.lark(tools, tokenizer, parallel=seed % 2 == 0))
    text, finish = generate(tokenizer, Constraint(grammar), max_tokens=160, seed=seed)
    parsed = form.parse(text)
    assert finish == "stop" and parsed is not None, text
    head, calls = parsed
    assert head == "" and calls
    schemas = {t.name: t.parameters for t in tools}
    for call in calls:
        jsonschema.validate(json.loads(call.arguments), schemas[call.name])


def test_deepseek_history_is_rendered_not_dropped():
    tokenizer = small_tokenizer(DEEPSEEK_TEMPLATE, DEEPSEEK_MARKERS)
    messages = [{"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": "", "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "get_weather",
                                                                  "arguments": '{"city": "Paris"}'}}]},
                {"role": "tool", "content": "sunny", "tool_call_id": "c1"}]
    text = tokenizer.render_chat(messages)
    assert (f"{DS.call_begin}function{DS.sep}get_weather\n```json\n" + '{"city": "Paris"}') in text
    assert "<｜tool▁outputs▁begin｜>sunny" in text and text.endswith("<｜Assistant｜><think>\n")
