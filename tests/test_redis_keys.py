"""The key layout is spelled once: what the coordinator writes, status reads back."""

from sidecar.redis_keys import RedisKeys


def test_a_per_replica_key_taken_apart_gives_back_its_fingerprint_and_replica():
    k = RedisKeys("mx")
    for kind, make in (("src", k.record), ("hb", k.heartbeat), ("readers", k.readers)):
        parsed = k.per_replica(make("fp1", "node-1-ab"), kind)
        assert parsed is not None and (parsed.fingerprint, parsed.replica) == ("fp1", "node-1-ab")
    assert k.seed_fingerprint(k.seed("fp1")) == "fp1"


def test_keys_of_another_shape_or_prefix_are_not_taken_for_records():
    k = RedisKeys("mx")
    for key in ("mx:fp:hb:r", "other:fp:src:r", "mx:fp:src:", "mx:a:b:src:r", k.agent("x"), "mx:fp:sources"):
        assert k.per_replica(key, "src") is None, key
    assert k.seed_fingerprint("mx:a:b:seed") is None and k.seed_fingerprint("other:fp:seed") is None
