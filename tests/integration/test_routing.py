"""Prefix-cache-aware routing (catalog `routing: prefix_aware`): requests that share a prompt
prefix land on the replica that has seen it, while the load is balanced, and spill over to the
other replica once that one is saturated. `prefix-chat` runs two fake replicas, each naming
itself in `system_fingerprint`; it takes 4 requests at once per replica and spills once one
replica's queue is 2 longer than the other's."""

from __future__ import annotations

import collections
from concurrent.futures import ThreadPoolExecutor

import pytest
from openai import OpenAI

pytestmark = pytest.mark.integration

PREFIXES = [
    f"You are assistant number {number}. " + " ".join(f"rule-{number}-{word}" for word in range(60))
    for number in range(4)
]


def ask(client: OpenAI, prefix: str, question: str, tokens: int = 4) -> str:
    answer = client.chat.completions.create(
        model="prefix-chat",
        messages=[{"role": "system", "content": prefix}, {"role": "user", "content": question}],
        max_tokens=tokens,
    )
    return answer.system_fingerprint


@pytest.fixture
def client(marketplace):
    key = marketplace.create_key(name="routing", credit_usd=5)["key"]
    with OpenAI(base_url=f"{marketplace.base_url}/v1", api_key=key, max_retries=0) as openai:
        yield openai


def test_requests_sharing_a_prefix_land_on_one_replica_while_the_load_is_balanced(client):
    # Each conversation's first request, one after another: a new prefix goes to the replica
    # whose prefix tree is smallest, so the conversations are spread over both replicas.
    homes = [ask(client, prefix, "question 0") for prefix in PREFIXES]

    # Then two conversations at a time, one request each at a time: the replicas' queues never
    # differ by more than the threshold, so each conversation's prefix decides its replica.
    def conversation(prefix: str) -> list[str]:
        return [ask(client, prefix, f"question {turn}") for turn in range(1, 12)]

    with ThreadPoolExecutor(2) as pool:
        replicas = [[home, *rest] for home, rest in zip(homes, pool.map(conversation, PREFIXES), strict=True)]

    for prefix, served in zip(PREFIXES, replicas, strict=True):
        _, count = collections.Counter(served).most_common(1)[0]
        assert count / len(served) >= 0.9, (prefix[:30], collections.Counter(served))
    # and the conversations are spread over both replicas, not all on one
    assert len({collections.Counter(served).most_common(1)[0][0] for served in replicas}) == 2, replicas


def test_a_saturated_replica_spills_its_prefix_over_to_the_other(client):
    prefix = "A shared prefix that everybody sends. " * 20
    home = ask(client, prefix, "warm up")
    assert ask(client, prefix, "again") == home  # the prefix has a home replica

    # 16 long requests at once with that prefix: 4 fill the home replica, and the queue beyond
    # the threshold sends the rest to the other one.
    def long_one(turn: int) -> str:
        return ask(client, prefix, f"burst {turn} [[fake-tokens=25]]", tokens=25)

    with ThreadPoolExecutor(16) as pool:
        served = collections.Counter(pool.map(long_one, range(16)))
    assert len(served) == 2 and min(served.values()) >= 2, served
