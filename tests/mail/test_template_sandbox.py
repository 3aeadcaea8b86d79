"""Newsletter templates cannot build anything bigger than a message may be: each way a template
builds a value is refused before it is built, where the size can be told from the arguments.
Sizes here are 10^12 characters: built, any of them would fail with MemoryError (or take
minutes), so a SecurityError in milliseconds shows the refusal came first."""

from __future__ import annotations

import time

import pytest
from jinja2 import Environment
from jinja2.exceptions import SecurityError

from jobs.mail.sandbox import TOO_LONG, html_env, render, text_env

HUGE = 10**12

ATTACKS = {
    "str.ljust": f"{{{{ 'x'.ljust({HUGE}) }}}}",
    "str.center": f"{{{{ 'x'.center({HUGE}) }}}}",
    "str.zfill": f"{{{{ '1'.zfill({HUGE}) }}}}",
    "str.expandtabs": f"{{{{ ('\\t' * 1000).expandtabs({HUGE}) }}}}",
    "str.format width": f"{{{{ '{{:>{HUGE}}}'.format('x') }}}}",
    "str.format by item": f"{{{{ '{{:>{HUGE}}}'['format']('x') }}}}",
    "% width": f"{{{{ '%{HUGE}s' % 'x' }}}}",
    "% precision": f"{{{{ '%.{HUGE}f' % 1.5 }}}}",
    "% star": "{{ '%*s' % (5, 'x') }}",
    "format filter": f"{{{{ '%{HUGE}s'|format('x') }}}}",
    "center filter": f"{{{{ 'x'|center({HUGE}) }}}}",
    "indent filter": f"{{{{ ('x\\n' * 1000)|indent({HUGE}) }}}}",
    "str.replace": "{{ ('x' * 500000).replace('x', 'x' * 1000000) }}",
    "replace filter": "{{ ('x' * 500000)|replace('x', 'x' * 1000000) }}",
    "* repeat": f"{{{{ 'x' * {HUGE} }}}}",
    "list + list": "{% set l = ['x'] * 400000 %}{{ (l + l)|length }}",
    "~ doubling in a namespace": (
        "{% set ns = namespace(x='a') %}{% for i in range(60) %}"
        "{% set ns.x = ns.x ~ ns.x %}{% endfor %}{{ ns.x|length }}"
    ),
    "+ doubling in a namespace": (
        "{% set ns = namespace(x='a') %}{% for i in range(60) %}"
        "{% set ns.x = ns.x + ns.x %}{% endfor %}{{ ns.x|length }}"
    ),
    "join": "{{ (['x' * 400000] * 2)|join('') }}",
    "** exponent": f"{{{{ 10 ** {HUGE} }}}}",
}


@pytest.mark.parametrize("env", [text_env, html_env], ids=["text", "html"])
@pytest.mark.parametrize("template", ATTACKS.values(), ids=ATTACKS.keys())
def test_a_value_too_big_for_a_message_is_refused_before_it_is_built(
    env: Environment, template: str
) -> None:
    started = time.perf_counter()
    with pytest.raises(SecurityError) as refused:
        render(env.from_string(template), {})
    assert time.perf_counter() - started < 1.0
    assert str(refused.value) in (TOO_LONG, "'*' widths are not allowed in templates") or (
        "exponent" in str(refused.value)
    )


@pytest.mark.parametrize(
    "template",
    ["{% set l = [] %}{{ l.append(1) }}", "{{ lipsum(100000) }}"],
    ids=["list.append", "lipsum"],
)
def test_ways_to_grow_values_in_a_loop_are_not_there(template: str) -> None:
    with pytest.raises(Exception, match=r"unsafe|undefined"):
        render(text_env.from_string(template), {})


def test_ordinary_templates_render_as_before() -> None:
    template = (
        "Hello {{ name|title }}, {{ '%5.2f' % total }} {{ '{:>4}'.format(code) }} "
        "{{ first ~ '-' ~ last }} {{ [1, 2] + [3] }} {{ 'a b'|replace('a', 'c') }} "
        "{{ 'x'|center(5) }}|{{ ('line\nline')|indent(2) }}"
    )
    out = render(
        text_env.from_string(template),
        {"name": "ada", "total": 3.14159, "code": "A", "first": "F", "last": "L"},
    )
    assert out == "Hello Ada,  3.14    A F-L [1, 2, 3] c b   x  |line\n  line"
