"""Job id rule (`job_id_problems`): 1..128 characters of ASCII letters, digits and `-_.:@[]`.

Table tests (hypothesis is not installed in the venv): every id the system itself makes passes,
and each kind of bad id is refused with a message that names the field and what is wrong."""

from __future__ import annotations

import re
import string
import uuid

import pytest

from cordum.agent.v1 import job_pb2
from cordum.gateway.dlq import retry_job_id
from cordum.store.validate import JOB_ID_PUNCTUATION, MAX_JOB_ID_LEN, job_id_problems, validate_job_request

UUID = str(uuid.UUID(int=0x1234_5678_9ABC_DEF0_1234_5678_9ABC_DEF0, version=4))

SYSTEM_IDS = [
    UUID,  # the gateway's submit
    f"{UUID}-retry-0a1b2c3d",  # DLQ retry
    f"{UUID}-retry-0a1b2c3d-retry-ffffffff",  # retry of a retry
    f"{UUID}:build@1",  # workflow step `<run>:<step>@<attempt>`
    f"{UUID}:fan_out[12]@3",  # for_each / loop child
    f"{UUID}:deploy.prod@1",
    f"comp-{UUID}",  # compensation jobs
    "job-1",
    "j",
    "x" * MAX_JOB_ID_LEN,
    string.ascii_letters + string.digits + JOB_ID_PUNCTUATION,
]


@pytest.mark.parametrize("job_id", SYSTEM_IDS)
def test_ids_the_system_makes_are_valid(job_id):
    assert job_id_problems(job_id) == []


@pytest.mark.parametrize(
    ("job_id", "says"),
    [
        ("", "job_id is empty"),
        ("x" * (MAX_JOB_ID_LEN + 1), f"job_id is {MAX_JOB_ID_LEN + 1} characters long (max {MAX_JOB_ID_LEN})"),
        ("a{b}", "job_id contains '{' or '}'"),
        ("a{b", "job_id contains '{' or '}'"),
        ("a}b", "job_id contains '{' or '}'"),
        ("a b", "' '"),
        ("a\tb", r"'\t'"),
        ("a\nb", r"'\n'"),
        ("a\x00b", r"'\x00'"),
        ("a\x7fb", r"'\x7f'"),
        ("job.*", "'*'"),
        ("job.>", "'>'"),
        ("a/b", "'/'"),
        ("a?b", "'?'"),
        ("a,b", "','"),
        ("é", "'é'"),  # ASCII letters only
        ("٣", "'٣'"),  # a non-ASCII digit
        ("a\u200bb", r"'\u200b'"),  # zero-width space
    ],
)
def test_bad_ids_are_named(job_id, says):
    problems = job_id_problems(job_id)
    assert problems, job_id
    assert all(p.startswith("job_id ") for p in problems), problems
    assert any(says in p for p in problems), problems


def test_every_ascii_character_outside_the_charset_is_refused():
    allowed = set(string.ascii_letters + string.digits + JOB_ID_PUNCTUATION)
    for code in range(128):
        char = chr(code)
        assert (job_id_problems(f"a{char}b") == []) == (char in allowed), repr(char)


def test_length_boundary():
    assert job_id_problems("a" * MAX_JOB_ID_LEN) == []
    assert len(job_id_problems("a" * (MAX_JOB_ID_LEN + 1))) == 1
    assert MAX_JOB_ID_LEN == 128


def test_several_problems_are_all_reported_and_the_field_is_named():
    problems = job_id_problems("{" + " " * 200 + "}", field="path job id")
    assert len(problems) == 3, problems
    assert all(p.startswith("path job id ") for p in problems)
    assert "202 characters" in problems[0] and "'{' or '}'" in problems[1] and "' '" in problems[2]
    assert "{" not in problems[2].split("allowed")[0]  # braces have their own message


def test_a_long_list_of_bad_characters_is_cut_short():
    (problem,) = job_id_problems("a!#$%&()+")
    assert "('!', '#', '$', '%', '&', ...)" in problem and "'('" not in problem


def test_validate_job_request_reports_job_id_problems():
    assert validate_job_request(job_pb2.JobRequest(job_id=UUID, topic="job.x")) == []
    (problem,) = validate_job_request(job_pb2.JobRequest(job_id="a{b}", topic="job.x"))
    assert problem.startswith("job_id contains '{' or '}'")
    (problem,) = validate_job_request(job_pb2.JobRequest(job_id="x" * 129, topic="job.x"))
    assert "129 characters" in problem
    assert validate_job_request(job_pb2.JobRequest(job_id="", topic="job.x")) == ["job_id is empty"]


RETRY_SUFFIX = re.compile(r"-retry-[0-9a-f]{8}$")


def test_dlq_retry_ids_keep_the_spec_shape_and_always_stay_valid():
    assert retry_job_id(UUID, "0a1b2c3d") == f"{UUID}-retry-0a1b2c3d"
    assert RETRY_SUFFIX.search(retry_job_id(UUID))
    # a chain of retries: `<old>-retry-<hex>` while it fits, then the older links are dropped
    job_id = UUID
    for n in range(20):
        new_id = retry_job_id(job_id, f"{n:08x}")
        assert job_id_problems(new_id) == [], new_id
        assert new_id.startswith(UUID) and new_id.endswith(f"-retry-{n:08x}")
        if len(job_id) + 15 <= MAX_JOB_ID_LEN:
            assert new_id == f"{job_id}-retry-{n:08x}"
        else:
            assert new_id == f"{UUID}-retry-{n:08x}"
        job_id = new_id
    # a long base without a retry chain is shortened to fit
    long_base = "w" * MAX_JOB_ID_LEN
    assert retry_job_id(long_base, "deadbeef") == "w" * (MAX_JOB_ID_LEN - 15) + "-retry-deadbeef"
