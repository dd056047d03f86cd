"""The JSON rules of service/events.py, checked on a body's bytes without building it.

A Powens body can be 8 MiB (service/powens_events.py). Read by ``json.loads`` it becomes Python
objects several times its size; msgspec instead reads only the few fields a type declares and skips
the rest, checking its syntax (and refusing NaN and Infinity, which are not JSON) without building
it. What msgspec does not check while it skips is what our rules add to the syntax: strict UTF-8
inside strings, the depth, and numbers Python's json refuses (integers past its digit limit) or reads
as infinity (``1e999``), which json.loads would hand the worker. :func:`plain` checks those on the
bytes, in C loops (``isascii``, ``translate``, ``replace``, regular expressions) and a few megabytes at
most. It may say no to a body the rules accept (``"1e999"`` inside a string, a run of 300 digits):
the caller then applies the rules the exact way (:func:`service.events.load_object`), so that this
spares memory and never changes a decision.
"""

from __future__ import annotations

import codecs
import math
import re

_CHUNK = 1 << 16  # the body is checked 64 KiB at a time: never decoded or copied whole
# Depth: brackets kept (objects' as arrays'; the depth is the same), quotes kept to find strings.
_BRACKETS = bytes.maketrans(b"{}", b"[]")
_NOT_STRUCTURE = bytes(b for b in range(256) if b not in b'"[]{}')
_STRINGS = re.compile(rb'(?:"[^"]*+")++')  # once escapes are gone, every quote opens or closes one
# A number with an exponent anywhere (in strings too: those only cost a float() each), and long runs
# of digits: below 300 digits without an exponent, an integer is within json's digit limit (4,300)
# and a float finite.
_EXPONENT = re.compile(rb"-?[0-9]+(?:\.[0-9]+)?[eE][-+]?[0-9]+")
_MAYBE_EXPONENT = re.compile(rb"[0-9][eE][-+0-9]")
_LONG_NUMBER = re.compile(rb"[0-9]{300}")


def plain(body: bytes, max_depth: int) -> bool:
    """Whether json.loads under our rules (service/events.py) reads a body msgspec has read as JSON:
    strict UTF-8, nested at most ``max_depth``, every number finite and within json's limits."""
    return utf8(body) and depth_within(body, max_depth) and numbers_plain(body)


def utf8(body: bytes) -> bool:
    """Strict UTF-8 (no encoded surrogates, no overlong forms), as ``bytes.decode("utf-8")`` checks."""
    if body.isascii():
        return True
    decoder = codecs.getincrementaldecoder("utf-8")("strict")
    view = memoryview(body)
    try:
        for start in range(0, len(view), _CHUNK):
            decoder.decode(view[start : start + _CHUNK], final=start + _CHUNK >= len(view))
    except UnicodeDecodeError:
        return False
    return True


def depth_within(body: bytes, limit: int) -> bool:
    """Whether lists and objects nest at most ``limit`` deep in valid JSON (``{}`` is 1 deep).

    Its brackets first, a chunk at a time: escaped backslashes, then escaped quotes, removed (read
    left to right, as a parser reads them; a chunk never ends inside a run of backslashes), then
    all but quotes and brackets. What is left of strings is quotes around their brackets, removed
    with them (a string the chunk ends in is closed, and opened again in the next). Each pass of
    ``replace(b"[]", b"")`` then removes exactly the innermost containers: what is left after
    ``limit`` passes nests deeper.
    """
    if body.count(b"[") + body.count(b"{") <= limit:
        return True
    parts: list[bytes] = []
    start, inside = 0, False
    while start < len(body):
        end = min(start + _CHUNK, len(body))
        while end < len(body) and body[end - 1] == 0x5C:  # a backslash: the escape may go on
            end += 1
        chunk = body[start:end].replace(b"\\\\", b"").replace(b'\\"', b"")
        skeleton = (b'"' if inside else b"") + chunk.translate(_BRACKETS, _NOT_STRUCTURE)
        inside = skeleton.count(b'"') % 2 == 1
        parts.append(_STRINGS.sub(b"", skeleton + b'"' if inside else skeleton))
        start = end
    brackets = b"".join(parts)
    del parts
    for _ in range(limit):
        if not brackets:
            return True
        brackets = brackets.replace(b"[]", b"")
    return not brackets


def numbers_plain(body: bytes) -> bool:
    """No number json would refuse (an integer past its digit limit) or read as infinity; False
    also for such a text inside a string (the caller then checks the exact way)."""
    if _LONG_NUMBER.search(body):
        return False
    if not _MAYBE_EXPONENT.search(body):
        return True
    return all(math.isfinite(float(m[0])) for m in _EXPONENT.finditer(body))
