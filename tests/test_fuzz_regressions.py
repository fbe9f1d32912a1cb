"""One test per crash the fuzzers found (schemathesis in tests/test_fuzz_api.py, hypothesis in
tests/test_properties_*.py), each sending the input that crashed and checking the clear answer
that replaced the crash."""

from __future__ import annotations

from pathlib import Path

import pytest

from loft.serve.feedback import parse_feedback
from loft.serve.protocol import InvalidRequestError
from portal_client import portal_for

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("thumbs", ["{}", "[]", '["up"]', '{"up": 1}'])
def test_feedback_thumbs_of_the_wrong_type_is_a_400(thumbs: str) -> None:
    """schemathesis: {"id": "0", "thumbs": {}} was a 500 (TypeError: unhashable type: 'dict')."""
    with pytest.raises(InvalidRequestError, match='\'thumbs\' must be "up" or "down"') as e:
        parse_feedback(f'{{"id": "chatcmpl-1", "thumbs": {thumbs}}}'.encode())
    assert e.value.param == "thumbs"


@pytest.fixture(scope="module")
def portal(tmp_path_factory: pytest.TempPathFactory):
    with portal_for(tmp_path_factory.mktemp("fuzz-regress") / "home") as p:
        yield p


@pytest.mark.parametrize(
    "path",
    [
        "/api/tokens?offset=91963485104746954985790504960",  # found by schemathesis: was a 500
        "/api/jobs?offset=1180591620717411303424",
        "/api/users?offset=9223372036854775807",
        "/api/jobs/nope/events?log_from=1180591620717411303424",
    ],
)
def test_huge_offsets_are_a_422_not_a_500(portal, path: str) -> None:
    """An offset past SQLite's INTEGER (OverflowError inside the query) was an internal error."""
    r = portal.client(raise_server_exceptions=False).get(path, headers=portal.bearer("admin"))
    assert r.status_code == 422, r.text
    assert r.json()["error"]["type"] == "invalid_request"
    assert "less than or equal to" in r.json()["error"]["message"]


def test_a_bare_carriage_return_in_csv_is_a_problem_on_its_line(tmp_path: Path) -> None:
    """hypothesis: the bytes b'\\r\\x00' in a .csv raised _csv.Error out of the reader."""
    from loft.data.readers import read_file

    path = tmp_path / "old-mac.csv"
    path.write_bytes(b"text\nhi\rthere\nfine\n")
    result = read_file(path)
    assert result.problems == [
        f"{path}:2: record: invalid CSV: new-line character seen in unquoted field - do you need "
        "to open the file in universal-newline mode?"
    ]
    assert [(r.line, r.data) for r in result.records] == [(3, {"text": "fine"})]


@pytest.mark.parametrize(
    ("raw", "kind"),
    [
        (rb'{"model": "m", "messages": [{"role": "user", "content": "\ud800x"}]}', "chat"),
        (rb'{"model": "m", "prompt": "hi", "user": "\udbca\udf2c\udc00"}', "completion"),
        (rb'{"model": "m", "prompt": "ok", "\uda2f": {}}', "completion"),
    ],
)
def test_a_lone_surrogate_in_a_request_is_a_400(raw: bytes, kind: str) -> None:
    """Found while triaging a schemathesis failure: a body whose JSON escapes spell a lone
    surrogate (valid JSON, not valid Unicode) was a 500 (the tokenizer's TypeError, and a
    UnicodeEncodeError writing the audit line)."""
    from loft.serve.protocol import parse_body

    with pytest.raises(InvalidRequestError, match="unpaired UTF-16 surrogate"):
        parse_body(raw, kind)
    with pytest.raises(InvalidRequestError, match="unpaired UTF-16 surrogate"):
        parse_feedback(rb'{"id": "chatcmpl-\udc00", "thumbs": "up"}')
    emoji = rb'{"model": "m", "messages": [{"role": "user", "content": "\ud83d\ude00"}]}'
    assert parse_body(emoji, "chat").messages[0].content == "\N{GRINNING FACE}"


@pytest.mark.parametrize("temperature", [3.142933060828732e-78, 1e-300, 5e-324, 9.9e-6])
def test_a_vanishing_temperature_samples_greedily(temperature: float) -> None:
    """schemathesis: temperature=3.1e-78 made logits / temperature overflow to inf, the
    probabilities NaN and torch.multinomial fail: a 500 ("generation failed")."""
    from loft.core.specs import ServeConfig
    from loft.serve.protocol import parse_body, sampling_params

    body = f'{{"model": "m", "prompt": "hi", "temperature": {temperature!r}, "top_p": 0.5}}'
    params = sampling_params(ServeConfig(base_model="m"), parse_body(body.encode(), "completion"))
    assert (params.temperature, params.top_p) == (0.0, 1.0)
    body = '{"model": "m", "prompt": "hi", "temperature": 1e-5, "top_p": 0.5}'
    params = sampling_params(ServeConfig(base_model="m"), parse_body(body.encode(), "completion"))
    assert (params.temperature, params.top_p) == (1e-5, 0.5)
