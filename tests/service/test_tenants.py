#!/usr/bin/env python3
"""attnd end to end, the worker pool and tenants: Python gRPC clients against real `attnd serve`
processes (one per test class, each with the options it tests).

    ATTND_BIN=build/service/attnd ATTND_PY=build/py python3 tests/service/test_tenants.py

Every Attend output is checked against the float64 NumPy reference of tests/service/
attnd_testlib.py. No assertion depends on timing. Randomized tests print their seed first; set
ATTND_TEST_SEED=N to replay a run. The last line is `N passed, M failed`."""
import os
import sys
import time
import unittest

sys.dont_write_bytecode = True  # no __pycache__ in the source tree
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import attnd_testlib as tl  # noqa: E402  (re-execs under the system python3 when needed)
from attnd_testlib import grpc, np, pb  # noqa: E402

SEED = int(os.environ.get("ATTND_TEST_SEED", str(int(time.time() * 1000) % (1 << 31))))
print("seed %d (rerun with ATTND_TEST_SEED=%d)" % (SEED, SEED), flush=True)


def rng_for(test, extra=0):
    h = sum(ord(c) * (i + 1) for i, c in enumerate(test.id())) + 7919 * extra
    return np.random.default_rng([SEED, h & 0x7FFFFFFF])


def stream_decode(sess, seq, steps, layer, rng):
    """One AttendStream of `steps` decode requests on seq, each at the position the previous
    one leaves: run out of order, a request would start past the cached length (OUT_OF_RANGE)
    or attend to the wrong keys. Checks every response against the reference, in order."""
    start = sess.ref.seq_len(seq, layer)
    calls = [tl.Call(sess.model, [(seq, start + i, 1)], rng) for i in range(steps)]
    reqs = [c.request(sess.name, layer) for c in calls]
    responses = list(sess.stub.AttendStream(iter(reqs), timeout=tl.RPC_TIMEOUT_S))
    if len(responses) != steps:
        raise AssertionError("%d responses to %d requests" % (len(responses), steps))
    m = sess.model
    for i, (c, resp) in enumerate(zip(calls, responses)):
        want = sess.ref.run(layer, c.chunks, c.q, c.k, c.v)
        got = tl.from_bytes(resp.out, m.dtype, (1, m.hq, m.d))
        err = tl.mismatch(got, want, m.dtype)
        if err:
            raise AssertionError("session %s request %d of the stream: %s" % (sess.name, i, err))


class TPool(unittest.TestCase):
    """--workers-per-device 2: sessions spread over two CPU workers (least-loaded at creation)."""

    def test_two_workers_keep_each_sessions_order_and_results(self):
        """Six sessions of three models on two workers, two clients each: prefill, then
        pipelined decode streams (each request depends on the previous one) interleaved with
        unary calls; every output exact, every session's figures right at the end."""
        srv = tl.AttndServer(extra_args=["--workers-per-device", "2"]).start()
        try:
            models = [tl.Model(num_layers=2, hq=8, hkv=2, d=64, dtype="bf16", block_size=16),
                      tl.Model(num_layers=1, hq=4, hkv=4, d=128, dtype="f32"),
                      tl.Model(num_layers=2, hq=8, hkv=1, d=80, dtype="f16", block_size=8)]
            stub0 = tl.pb_grpc.AttentionStub(srv.channel())
            names = ["pool-%d" % i for i in range(6)]
            for i, name in enumerate(names):
                tl.Session(stub0, name, models[i % 3], capacity=8192).create()
            seeds = rng_for(self).integers(0, 1 << 31, size=12)
            views = []

            def client(ci):
                rng = np.random.default_rng(int(seeds[ci]))
                name = names[ci % 6]
                v = tl.Session(tl.pb_grpc.AttentionStub(srv.channel()), name, models[(ci % 6) % 3])
                views.append(v)
                seq = 100 + ci
                v.attend([(seq, 0, int(rng.integers(5, 40)))], layer=0, rng=rng)
                for r in range(4):
                    stream_decode(v, seq, 8, 0, rng)
                    v.attend([(seq, v.ref.seq_len(seq, 0), 1)], layer=0, rng=rng)

            errors = tl.run_threads([lambda ci=ci: client(ci) for ci in range(12)],
                                    timeout=max(300.0, tl.RPC_TIMEOUT_S * 2))
            self.assertEqual(errors, [], "\n".join(errors))
            for name in names:
                info = stub0.GetSession(pb.GetSessionRequest(session=name),
                                        timeout=tl.RPC_TIMEOUT_S)
                mine = [v for v in views if v.name == name]
                self.assertEqual(info.kv_used_tokens, sum(v.ref.kv_used_tokens() for v in mine))
                self.assertEqual(info.attend_calls, 2 * (1 + 4 * 9))
            self.assertEqual(srv.stop(), 0, srv.log_text())
        finally:
            srv.cleanup()


if __name__ == "__main__":
    tl.main()
