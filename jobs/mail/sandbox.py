"""The sandbox newsletter templates run in: a caller's Jinja2 code, kept away from Python's
internals (Jinja2's immutable sandbox) and from building anything bigger than a message may be.

Counting the output as it streams is not enough: `'x'.ljust(10**9)`, `'%999999999s' % x`,
`s|center(10**9)`, `s.replace(...)`, `l + l` and `~` on a namespace in a loop build their value
in full before a byte is output (one doubling loop reached gigabytes). So every way a template
builds a value is checked, before it is built where its size can be told from its arguments
(widths, counts, lengths) and right after otherwise, against MAX_RENDERED_CHARS:
- calls of methods and globals (`call`), the binary operators `*`, `**`, `+` and `%`;
- every filter (wrapped), and `~` (the code generator wraps each concatenation).
What slips through all of that still meets the pool process's memory limit (jobs.cpulimit).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from typing import Any

from jinja2 import Environment, Template
from jinja2.compiler import CodeGenerator, Frame
from jinja2.exceptions import SecurityError
from jinja2.nodes import Concat, EvalContext
from jinja2.runtime import Context
from jinja2.sandbox import ImmutableSandboxedEnvironment

from jobs.mail.email import MAX_BODY_CHARS

MAX_RENDERED_CHARS = MAX_BODY_CHARS  # what one value, or one rendered template, may grow to
TOO_LONG = f"template output exceeded {MAX_RENDERED_CHARS} characters"
MAX_EXPONENT = 1000

# Numbers in a format: "{:>99999}" (str.format) and "%99999s" or "%.99999f" (the % operator).
_FORMAT_FIELD = re.compile(r"\{[^{}]*\}")
_PERCENT_SPEC = re.compile(r"%[-#0 +]*(\*|\d+)?(?:\.(\*|\d+))?")
_WIDTH_METHODS = frozenset({"ljust", "rjust", "center", "zfill"})


def too_long(size: int) -> None:
    if size > MAX_RENDERED_CHARS:
        raise SecurityError(TOO_LONG)


def checked(value: Any) -> Any:
    """`value`, if it is not a string or collection longer than a message may be."""
    if isinstance(value, str | list | tuple | dict) and len(value) > MAX_RENDERED_CHARS:
        raise SecurityError(TOO_LONG)
    return value


def check_format(template: str) -> None:
    """Widths and precisions in a `str.format` or `%` format; `*` (from the arguments) is
    refused: templates have no need of it."""
    for field in _FORMAT_FIELD.findall(template):
        for number in re.findall(r"\d+", field.partition(":")[2]):
            too_long(int(number))
    for width, precision in _PERCENT_SPEC.findall(template):
        if "*" in (width, precision):
            raise SecurityError("'*' widths are not allowed in templates")
        too_long(int(width or 0))
        too_long(int(precision or 0))


def check_replace(text: str, old: str, new: str, count: int = -1) -> None:
    times = text.count(old) if old else len(text) + 1
    if count >= 0:
        times = min(times, count)
    too_long(len(text) + times * (len(new) - len(old)))


def check_str_method(text: str, name: str, args: tuple[Any, ...]) -> None:
    """What a str method would build, told from its arguments, before it is built."""
    if name in _WIDTH_METHODS and args and isinstance(args[0], int):
        too_long(args[0])
    elif name == "expandtabs":
        too_long(len(text) * (args[0] if args and isinstance(args[0], int) else 8))
    elif name == "replace" and len(args) >= 2 and all(isinstance(a, str) for a in args[:2]):
        check_replace(text, args[0], args[1], *args[2:3])
    elif name in ("format", "format_map"):
        check_format(text)


def _checked_filter(name: str, function: Callable[..., Any]) -> Callable[..., Any]:
    """A filter whose result is checked, and whose arguments are first where they tell."""

    @functools.wraps(function)  # keeps jinja_pass_arg: the filter gets its context as before
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        values = [a for a in args if not isinstance(a, _PASSED)]  # after a passed context
        if values and isinstance(values[0], str):
            text, rest = values[0], values[1:]
            if name == "center":
                too_long(int(rest[0] if rest else kwargs.get("width", 80)))
            elif name == "indent":
                width = rest[0] if rest else kwargs.get("width", 4)
                too_long(len(text) + (text.count("\n") + 1) * len(str(width)) * _int(width))
            elif name == "format":
                check_format(text)
            elif name == "replace" and len(rest) >= 2:
                check_replace(text, str(rest[0]), str(rest[1]), *rest[2:3])
        return checked(function(*args, **kwargs))

    return wrapper


_PASSED = (Context, EvalContext, Environment)  # what Jinja2 passes a filter before its value


def _int(value: Any) -> int:
    return value if isinstance(value, int) else 1  # indent's width may be a string


class LimitedCodeGenerator(CodeGenerator):
    """`a ~ b` is compiled to a join of its parts: check what it built."""

    def visit_Concat(self, node: Concat, frame: Frame) -> None:
        self.write("environment.checked(")
        super().visit_Concat(node, frame)
        self.write(")")


class LimitedSandbox(ImmutableSandboxedEnvironment):
    """Jinja2's immutable sandbox (no Python internals, no `list.append` growing a value in a
    loop), where no value grows past MAX_RENDERED_CHARS. Loops are bounded by the sandbox's
    `range` (100,000 items) and, in all, by the deadline of the pool process that renders."""

    code_generator_class = LimitedCodeGenerator
    intercepted_binops = frozenset({"*", "**", "+", "%"})

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.globals.pop("lipsum", None)  # lipsum(10**6): text a template has no need of
        self.filters = {name: _checked_filter(name, f) for name, f in self.filters.items()}

    @staticmethod
    def checked(value: Any) -> Any:
        return checked(value)

    def call_binop(self, context: Context, operator: str, left: Any, right: Any) -> Any:
        if operator == "*":
            for seq, times in ((left, right), (right, left)):
                if isinstance(seq, str | list | tuple) and isinstance(times, int):
                    too_long(len(seq) * times)
        elif operator == "**" and isinstance(right, int) and abs(right) > MAX_EXPONENT:
            raise SecurityError(f"template exponent larger than {MAX_EXPONENT}")
        elif operator == "+" and _sized(left) and _sized(right):
            too_long(len(left) + len(right))
        elif operator == "%" and isinstance(left, str):
            check_format(left)
        return checked(super().call_binop(context, operator, left, right))

    def getattr(self, obj: Any, attribute: str) -> Any:
        if isinstance(obj, str) and attribute in ("format", "format_map"):
            check_format(obj)  # Jinja2 hands out a wrapper of str.format: checked here
        return super().getattr(obj, attribute)

    def getitem(self, obj: Any, argument: Any) -> Any:
        if isinstance(obj, str) and argument in ("format", "format_map"):
            check_format(obj)
        return super().getitem(obj, argument)

    def call(__self, __context: Context, __obj: Any, *args: Any, **kwargs: Any) -> Any:
        owner = getattr(__obj, "__self__", None)
        if isinstance(owner, str):
            check_str_method(owner, getattr(__obj, "__name__", ""), args)
        return checked(super().call(__context, __obj, *args, **kwargs))


def _sized(value: Any) -> bool:
    return isinstance(value, str | list | tuple)


def render(template: Template, variables: dict[str, Any]) -> str:
    """The template's output, stopped as soon as it grows past MAX_RENDERED_CHARS."""
    parts: list[str] = []
    size = 0
    for part in template.generate(variables):
        size += len(part)
        too_long(size)
        parts.append(part)
    return "".join(parts)


# Templates come from API callers.
text_env = LimitedSandbox(autoescape=False)
html_env = LimitedSandbox(autoescape=True)
