"""What replicas tell each other through LISTEN/NOTIFY, and how it is written.

A payload starts with the instance name; the parts are separated by SEPARATOR.
Work: the requirements of newly queued work (left out when too long: any waiting
bot may look).  A job: its id, and when they fit its news -- the new stage, the
response once done, the bot -- so that its watchers need not read it back.  A
session: its name (its leases changed elsewhere, or it closed).
"""

from __future__ import annotations

import base64
from dataclasses import dataclass

from buildfleet.scheduler.model import Stage

SEPARATOR = "\x1f"
# PostgreSQL refuses NOTIFY payloads of 8000 bytes and more: a payload that would be
# longer is sent without what the listener can otherwise look up.
MAX_PAYLOAD = 7900


@dataclass(frozen=True, slots=True)
class JobNews:
    """What a job's watchers learn from its notification without reading it back."""

    stage: Stage
    worker: str = ""
    response: bytes | None = None  # the ExecuteResponse of a COMPLETED job


def fits(payload: str) -> bool:
    return len(payload.encode()) <= MAX_PAYLOAD


def news_suffix(news: JobNews) -> str:
    """What follows a job's id in a payload with its news."""
    response = base64.b64encode(news.response).decode() if news.response is not None else ""
    return SEPARATOR.join(("", str(int(news.stage)), response, news.worker))


def work_payload(instance: str, requirements_json: str) -> str:
    """New work: its requirements (left out when too long: any waiting bot may look)."""
    payload = instance + SEPARATOR + requirements_json
    return payload if fits(payload) else instance + SEPARATOR


def job_payload(instance: str, job_id: str, news: JobNews | None) -> str:
    """A changed job, with its news when they fit."""
    return job_note(instance, job_id, news)[0]


def job_note(instance: str, job_id: str, news: JobNews | None) -> tuple[str, JobNews | None]:
    """(payload, the news it carries: None when they do not fit)."""
    plain = instance + SEPARATOR + job_id
    if news is not None:
        payload = plain + news_suffix(news)
        if fits(payload):
            return payload, news
    return plain, None


def read_job_payload(rest: str) -> tuple[str, JobNews | None]:
    """(job id, news) from a job payload without its instance name."""
    parts = rest.split(SEPARATOR, 3)
    if len(parts) < 4:
        return parts[0], None
    job_id, stage, response, worker = parts
    return job_id, JobNews(Stage(int(stage)), worker,
                           base64.b64decode(response) if response else None)
