"""The message policy for manifest reasons, as a rule tests can check (issue 13, "Also").

Every reason a user sees for a ``failed`` or ``partial`` video is a sentence about the video,
never only an exception's text from a library. The checkable form: a reason is one or more
clauses joined by "; " (``prepare`` joins a video's problems that way), and each clause

1. starts with the project's own words: a lower-case word or a number, not an exception's name
   (``RuntimeError: ...``, ``[Errno 1094995529] ...``) and not a capitalised library sentence
   (``Invalid data found when processing input``, ``Argument #4: Padding size ...``);
2. says what it is about: once library detail is set aside (anything in parentheses, anything
   after the first ": "), what is left names a part of the video (``VIDEO_WORDS``) or an amount
   of time in seconds.

Library text may follow our words (after a colon or in parentheses), never stand alone. The
rule rejects the bare messages of the numerical and media libraries (see test_message_policy).
"""

from __future__ import annotations

import re

EXCEPTION_NAME = re.compile(r"^\W*[A-Za-z_.]*(Error|Exception|Warning|Errno)\b")
OWN_WORDS_START = re.compile(r"^[a-z0-9]")
PARENTHESISED = re.compile(r"\([^()]*\)")
SECONDS = re.compile(r"\d+(\.\d+)? s\b")
VIDEO_WORDS = (
    "video",
    "audio",
    "file",
    "frame",
    "packet",
    "stream",
    "timestamp",
    "header",
    "decod",
    "media",
    "picture",
    "codec",
    "container",
    "spectrogram",
    "sample",
    "reading",
    "download",
    "listed",
)


def clauses(reason: str) -> list[str]:
    """The clauses of a reason, split at "; " outside parentheses."""
    depth, start, parts = 0, 0, []
    for i, char in enumerate(reason):
        depth += (char == "(") - (char == ")")
        if depth == 0 and reason.startswith("; ", i):
            parts.append(reason[start:i])
            start = i + 2
    parts.append(reason[start:])
    return parts


def _without_library_detail(clause: str) -> str:
    previous = None
    while previous != clause:
        previous, clause = clause, PARENTHESISED.sub(" ", clause)
    return clause.split(": ", 1)[0]


def reason_problem(reason) -> str | None:
    """None when ``reason`` follows the policy, else what is wrong with it (for the assert)."""
    if not isinstance(reason, str) or not reason.strip():
        return f"no reason given: {reason!r}"
    for clause in clauses(reason):
        if EXCEPTION_NAME.match(clause) or not OWN_WORDS_START.match(clause):
            return f"clause does not start with the project's own words: {clause!r}"
        lead = _without_library_detail(clause).lower()
        if not (any(word in lead for word in VIDEO_WORDS) or SECONDS.search(lead)):
            return f"clause says nothing about the video (what, where, how much): {clause!r}"
    return None


def policy_violations(manifest: dict[str, dict]) -> dict[str, str]:
    """{source: what is wrong} for every failed or partial entry whose reason breaks the policy."""
    found = {}
    for source, entry in manifest.items():
        if entry["status"] != "ok":
            problem = reason_problem(entry.get("reason"))
            if problem:
                found[source] = problem
    return found
