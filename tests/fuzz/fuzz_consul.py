"""atheris target: Consul's answers, headers and body (issue 10).

Input: an HTTP answer's header block and body, split at the first CRLF CRLF (no split: a
body alone). `X-Fuzz-Tags` / `X-Fuzz-Tagged-Address` / `X-Fuzz-Only-Passing` set the
mapping options. Properties, each raising ConsulDataError and nothing else:
* parse_answer_meta (a malformed X-Consul-Index), then answer_freshness, parse_retry_after
  and next_index never raise past it;
* the body as a health answer: decode_health_body + endpoints_from_health;
* the body as the catalog's service list (catalog_service_names) and as the check feed
  (CheckFeed.update twice: the second, on the same answer, reports no change).
Rerun: python tests/fuzz/fuzz_consul.py [corpus dirs or one input file] -dict=tests/fuzz/dicts/consul.dict
"""

import sys

import atheris

with atheris.instrument_imports(include=["softlb"]):
    from softlb import (
        CheckFeed,
        ConsulDataError,
        MappingOptions,
        answer_freshness,
        catalog_service_names,
        decode_health_body,
        decode_json_body,
        endpoints_from_health,
        next_index,
        parse_answer_meta,
        parse_retry_after,
    )


def split_answer(data: bytes) -> tuple[dict[str, str], bytes]:
    head, sep, body = data.partition(b"\r\n\r\n")
    if not sep:
        return {}, data
    headers = {}
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        headers[name.decode("latin-1").strip()] = value.decode("latin-1").strip()  # as httpx decodes them
    return headers, body


def expect_data_error(fn, *args):
    try:
        return fn(*args)
    except ConsulDataError:
        return None


def test_one_input(data: bytes) -> None:
    headers, body = split_answer(data)
    meta = expect_data_error(parse_answer_meta, headers)
    if meta is not None:
        answer_freshness(meta, 5.0)
        expect_data_error(next_index, 7, meta.index)
    parse_retry_after(headers.get("Retry-After"))
    tagged = headers.get("X-Fuzz-Tagged-Address", "")
    options = MappingOptions(tags=tuple(t for t in headers.get("X-Fuzz-Tags", "").split(",") if t),
                             tagged_address=tagged if tagged in ("lan", "wan") else "",
                             only_passing="X-Fuzz-Only-Passing" in headers)
    try:
        endpoints_from_health(decode_health_body(body), options)
    except ConsulDataError:
        pass
    parsed = expect_data_error(decode_json_body, body)
    if parsed is None and body.strip() != b"null":
        return
    expect_data_error(catalog_service_names, parsed)
    feed = CheckFeed()
    if expect_data_error(feed.update, parsed) is None and feed.primed:
        assert feed.update(parsed) == set()


if __name__ == "__main__":
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
