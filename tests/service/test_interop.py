#!/usr/bin/env python3
"""attnd end to end: a Python gRPC client (the generated stubs) against a real `attnd serve`.

    ATTND_BIN=build/service/attnd ATTND_PY=build/py python3 tests/service/test_interop.py
    python3 tests/service/test_interop.py --attnd-bin PATH --attnd-py DIR [unittest args]

Every Attend output is checked against a float64 NumPy reference of the op
(tests/service/attnd_testlib.py), and after every call that must fail, the session's figures and
its cached history are checked unchanged. Randomized tests print their seed first; set
ATTND_TEST_SEED=N to replay a run. The last line is `N passed, M failed`."""
import os
import re
import sys
import threading
import time
import unittest

sys.dont_write_bytecode = True  # no __pycache__ in the source tree
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import attnd_testlib as tl  # noqa: E402  (re-execs under the system python3 when needed)
from attnd_testlib import grpc, np, pb, health_pb  # noqa: E402

SEED = int(os.environ.get("ATTND_TEST_SEED", str(int(time.time() * 1000) % (1 << 31))))
print("seed %d (rerun with ATTND_TEST_SEED=%d)" % (SEED, SEED), flush=True)

SERVER = None
STUB = None
CHANNEL = None
_names = iter(range(1 << 30))


def setUpModule():
    global SERVER, STUB, CHANNEL
    SERVER = tl.AttndServer().start()
    CHANNEL = SERVER.channel()
    STUB = tl.pb_grpc.AttentionStub(CHANNEL)


def tearDownModule():
    if SERVER is None:
        return
    try:
        rc = SERVER.stop()
        if rc != 0:
            raise AssertionError("attnd serve exited with %s after SIGTERM:\n%s"
                                 % (rc, SERVER.log_text()))
    finally:
        SERVER.cleanup()


def uname(tag):
    """A session name unique in this run."""
    return "e2e-%s-%d" % (tag, next(_names))


def rng_for(test, extra=0):
    """A generator seeded from the run's seed and the test's id (each test replays alone)."""
    h = sum(ord(c) * (i + 1) for i, c in enumerate(test.id())) + 7919 * extra
    return np.random.default_rng([SEED, h & 0x7FFFFFFF])


def rpc_error(fn, *a, **kw):
    """Runs fn, expecting a grpc.RpcError; returns it (fails the test when the call succeeds)."""
    try:
        fn(*a, **kw)
    except grpc.RpcError as e:
        return e
    raise AssertionError("call succeeded, expected an error")


def names_field(details, field):
    return re.search(r"(?<![A-Za-z_])%s(?![A-Za-z_])" % re.escape(field), details or "")


class Base(unittest.TestCase):
    def new_session(self, model, capacity=4096, tag=None, stub=None):
        s = tl.Session(stub or STUB, uname(tag or self._testMethodName[5:20].replace("_", "-")),
                       model, capacity)
        return s.create()

    def assert_figures(self, sess):
        problem = sess.figures_problem()
        self.assertIsNone(problem, problem)

    def assert_code(self, err, code, field=None):
        self.assertEqual(err.code(), code, "got %s: %s" % (err.code(), err.details()))
        if field is not None:
            self.assertTrue(names_field(err.details(), field),
                            "status message %r does not name the field %r"
                            % (err.details(), field))


# ---- sessions, health, unknown methods ----------------------------------------------------------


class T1Sessions(Base):
    def test_create_idempotent_and_conflict(self):
        m = tl.Model(num_layers=2, hq=8, hkv=2, d=64, dtype="f16", window=32, name="llama-ish")
        name = uname("idem")
        req = pb.CreateSessionRequest(session=name, model=m.proto(), kv_capacity_tokens=1000)
        first = STUB.CreateSession(req, timeout=tl.RPC_TIMEOUT_S)
        again = STUB.CreateSession(req, timeout=tl.RPC_TIMEOUT_S)
        self.assertEqual(first, again)
        self.assertEqual(first.session, name)
        self.assertEqual(first.model.name, "llama-ish")
        # same name, another config: ALREADY_EXISTS, and the session is as it was
        for other in (tl.Model(num_layers=2, hq=8, hkv=2, d=128, dtype="f16", window=32,
                               name="llama-ish"),
                      tl.Model(num_layers=2, hq=8, hkv=2, d=64, dtype="bf16", window=32,
                               name="llama-ish"),
                      tl.Model(num_layers=2, hq=8, hkv=2, d=64, dtype="f16", window=16,
                               name="llama-ish")):
            with self.subTest(other=repr(other)):
                e = rpc_error(STUB.CreateSession, pb.CreateSessionRequest(
                    session=name, model=other.proto(), kv_capacity_tokens=1000),
                    timeout=tl.RPC_TIMEOUT_S)
                self.assert_code(e, grpc.StatusCode.ALREADY_EXISTS)
        e = rpc_error(STUB.CreateSession, pb.CreateSessionRequest(
            session=name, model=m.proto(), kv_capacity_tokens=5000), timeout=tl.RPC_TIMEOUT_S)
        self.assert_code(e, grpc.StatusCode.ALREADY_EXISTS)
        got = STUB.GetSession(pb.GetSessionRequest(session=name), timeout=tl.RPC_TIMEOUT_S)
        self.assertEqual(got, first)
        STUB.CloseSession(pb.CloseSessionRequest(session=name), timeout=tl.RPC_TIMEOUT_S)

    def test_create_resolves_defaults(self):
        m = tl.Model(num_layers=3, hq=4, hkv=4, d=80, dtype="bf16")
        s = self.new_session(m, capacity=100)
        info = s.info
        self.assertEqual(info.model.block_size, 16)
        self.assertAlmostEqual(info.model.scale, 1.0 / np.sqrt(80), places=6)
        self.assertEqual(info.kv_capacity_tokens, 112)  # rounded up to whole blocks
        self.assertEqual(info.kv_used_tokens, 0)
        self.assertEqual(info.num_sequences, 0)
        self.assertEqual(info.device, "cpu")
        self.assertEqual(info.model.num_layers, 3)
        self.assertEqual(info.model.head_dim, 80)
        self.assertEqual(info.model.dtype, pb.BF16)
        m2 = tl.Model(num_layers=2, hq=4, hkv=2, d=64, dtype="f32", block_size=8, scale=0.25,
                      layer_windows=[0, 8], soft_cap=30.0, alibi=[0.5, 0.25, 0.125, 0.0625],
                      sinks=[0.0, 1.0, -1.0, 2.0])
        s2 = self.new_session(m2, capacity=17)
        i2 = s2.info
        self.assertEqual(i2.kv_capacity_tokens, 24)
        self.assertEqual(i2.model.block_size, 8)
        self.assertEqual(i2.model.scale, 0.25)
        self.assertEqual(list(i2.model.layer_sliding_window), [0, 8])
        self.assertEqual(i2.model.logits_soft_cap, 30.0)
        self.assertEqual(list(i2.model.alibi_slopes), [0.5, 0.25, 0.125, 0.0625])
        self.assertEqual(list(i2.model.sinks), [0.0, 1.0, -1.0, 2.0])
        s.close()
        s2.close()

    def test_get_list_close(self):
        a = self.new_session(tl.Model(hq=2, hkv=1, d=64), tag="list-a")
        b = self.new_session(tl.Model(hq=4, hkv=2, d=128, dtype="f16"), tag="list-b")
        rng = rng_for(self)
        a.attend([(1, 0, 5)], rng=rng)
        listed = STUB.ListSessions(pb.ListSessionsRequest(), timeout=tl.RPC_TIMEOUT_S).sessions
        by_name = {x.session: x for x in listed}
        self.assertIn(a.name, by_name)
        self.assertIn(b.name, by_name)
        names = [x.session for x in listed]
        self.assertEqual(names, sorted(names), "ListSessions is sorted by name")
        self.assertEqual(by_name[a.name], a.get())
        self.assertEqual(by_name[a.name].num_sequences, 1)
        self.assertEqual(by_name[a.name].kv_used_tokens, 16)
        self.assertEqual(by_name[b.name].model.head_dim, 128)
        a.close()
        for fn, req in ((STUB.GetSession, pb.GetSessionRequest(session=a.name)),
                        (STUB.CloseSession, pb.CloseSessionRequest(session=a.name)),
                        (STUB.Release, pb.ReleaseRequest(session=a.name, seq_ids=[1]))):
            self.assert_code(rpc_error(fn, req, timeout=tl.RPC_TIMEOUT_S),
                             grpc.StatusCode.NOT_FOUND)
        call = tl.Call(a.model, [(1, 5, 1)], rng)
        self.assert_code(rpc_error(STUB.Attend, call.request(a.name, 0),
                                   timeout=tl.RPC_TIMEOUT_S), grpc.StatusCode.NOT_FOUND)
        listed = STUB.ListSessions(pb.ListSessionsRequest(), timeout=tl.RPC_TIMEOUT_S).sessions
        self.assertNotIn(a.name, [x.session for x in listed])
        self.assertIn(b.name, [x.session for x in listed])
        # the name is free again, for another config; the new session starts empty
        a2 = tl.Session(STUB, a.name, tl.Model(hq=8, hkv=8, d=64, dtype="bf16")).create()
        self.assertEqual(a2.info.num_sequences, 0)
        self.assertEqual(a2.info.model.num_query_heads, 8)
        a2.attend([(1, 0, 3)], rng=rng)
        self.assert_figures(a2)
        a2.close()
        b.close()

    def test_release(self):
        m = tl.Model(num_layers=2, hq=4, hkv=1, d=64, dtype="f16", block_size=8)
        s = self.new_session(m, capacity=512)
        rng = rng_for(self)
        s.attend([(10, 0, 20), (11, 0, 3), (12, 0, 9)], layer=0, rng=rng)
        s.attend([(10, 0, 20), (13, 0, 17)], layer=1, rng=rng)
        self.assert_figures(s)
        before = s.get()
        self.assertEqual(before.num_sequences, 4)
        self.assertEqual(before.kv_used_tokens, 24 + 8 + 16 + 24)
        released = s.release([10, 12, 999, 12])
        self.assertEqual(released, 2)
        after = s.get()
        self.assertEqual(after.num_sequences, 2)
        self.assertEqual(after.kv_used_tokens, 8 + 24)
        self.assertLess(after.kv_used_tokens, before.kv_used_tokens)
        self.assert_figures(s)
        self.assertEqual(s.release([]), 0)
        self.assertEqual(s.release([10, 12]), 0)
        # a released sequence is gone in every layer: it restarts at 0, and not past 0
        e = rpc_error(STUB.Attend, tl.Call(m, [(10, 5, 1)], rng).request(s.name, 1),
                      timeout=tl.RPC_TIMEOUT_S)
        self.assert_code(e, grpc.StatusCode.OUT_OF_RANGE)
        s.attend([(10, 0, 2)], layer=1, rng=rng)
        s.probe(11, layer=0, rng=rng)
        s.probe(13, layer=1, rng=rng)
        self.assert_figures(s)
        self.assertEqual(s.release([10, 11, 13]), 3)
        self.assertEqual(s.get().kv_used_tokens, 0)
        s.close()

    def test_health(self):
        h = tl.health_stub(CHANNEL)
        for svc in ("", "attnd.v1.Attention"):
            with self.subTest(service=svc):
                r = h.Check(health_pb.HealthCheckRequest(service=svc), timeout=tl.RPC_TIMEOUT_S)
                self.assertEqual(r.status, health_pb.HealthCheckResponse.SERVING)
        for svc in ("attnd.v1.Nope", "grpc.health.v1.Health", "x"):
            with self.subTest(service=svc):
                e = rpc_error(h.Check, health_pb.HealthCheckRequest(service=svc),
                              timeout=tl.RPC_TIMEOUT_S)
                self.assert_code(e, grpc.StatusCode.NOT_FOUND)

    def test_health_watch(self):
        """Watch sends the current status at once and keeps the stream open; an unknown service
        is SERVICE_UNKNOWN on the stream (not an error), as the health protocol says."""
        h = tl.health_stub(CHANNEL)
        for svc, want in (("", health_pb.HealthCheckResponse.SERVING),
                          ("attnd.v1.Attention", health_pb.HealthCheckResponse.SERVING),
                          ("attnd.v1.Nope", health_pb.HealthCheckResponse.SERVICE_UNKNOWN)):
            with self.subTest(service=svc):
                stream = h.Watch(health_pb.HealthCheckRequest(service=svc),
                                 timeout=tl.RPC_TIMEOUT_S)
                first = next(stream)
                self.assertEqual(first.status, want)
                time.sleep(0.1)
                self.assertTrue(stream.is_active(), "the watch ended after its first message")
                stream.cancel()
                e = rpc_error(next, stream)
                self.assert_code(e, grpc.StatusCode.CANCELLED)
        # the server carries on after its watchers left
        r = h.Check(health_pb.HealthCheckRequest(service=""), timeout=tl.RPC_TIMEOUT_S)
        self.assertEqual(r.status, health_pb.HealthCheckResponse.SERVING)

    def test_unknown_method(self):
        for path in ("/attnd.v1.Attention/Nope", "/attnd.v2.Attention/Attend",
                     "/grpc.health.v1.Health/Watch2"):
            with self.subTest(path=path):
                call = CHANNEL.unary_unary(path)
                e = rpc_error(call, b"", timeout=tl.RPC_TIMEOUT_S)
                self.assert_code(e, grpc.StatusCode.UNIMPLEMENTED)
        # the server still answers
        h = tl.health_stub(CHANNEL)
        self.assertEqual(h.Check(health_pb.HealthCheckRequest(), timeout=tl.RPC_TIMEOUT_S).status,
                         health_pb.HealthCheckResponse.SERVING)


# ---- Attend against the reference --------------------------------------------------------------

SHAPES = [  # (Hq, Hkv, D): GQA group 1 (MHA), 4, 8, MQA; head dims 64, 128, 80
    (4, 4, 64),
    (8, 2, 128),
    (8, 1, 80),
    (16, 2, 64),
    (4, 1, 128),
    (2, 2, 256),   # the largest head dim
    (4, 2, 8),     # the smallest
]


class T2Attend(Base):
    def exercise(self, s, rng, layers=1):
        """A prefill chunk, decode steps, a mixed batch, and a chunk over earlier context, on
        every layer; figures checked along the way."""
        for layer in range(layers):
            s.attend([(1, 0, 13)], layer=layer, rng=rng)           # prefill
            for _ in range(3):                                      # decode
                s.attend([(1, s.ref.seq_len(1, layer), 1)], layer=layer, rng=rng)
            s.attend([(2, 0, 21),                                   # prefill of a new sequence
                      (1, s.ref.seq_len(1, layer), 1)],             # + decode
                     layer=layer, rng=rng)
            s.attend([(2, 21, 6),                                   # chunk over earlier context
                      (3, 0, 1),                                    # one-token new sequence
                      (1, s.ref.seq_len(1, layer), 2)],             # two-token step
                     layer=layer, rng=rng)
            self.assert_figures(s)

    def test_dtypes_and_shapes(self):
        rng = rng_for(self)
        for dtype in ("f32", "f16", "bf16"):
            for hq, hkv, d in SHAPES:
                m = tl.Model(hq=hq, hkv=hkv, d=d, dtype=dtype)
                with self.subTest(model=repr(m)):
                    s = self.new_session(m)
                    self.exercise(s, rng)
                    s.close()

    def test_features(self):
        rng = rng_for(self)
        slopes8 = [2.0 ** -(i + 1) for i in range(8)]
        sinks8 = [0.5, -1.0, 2.0, 0.0, 1.5, -3.0, 4.0, 1.0]
        cases = [
            dict(window=8),
            dict(window=1),
            dict(num_layers=3, layer_windows=[0, 5, 16]),
            dict(soft_cap=2.5),
            dict(soft_cap=2.5, scale=0.5),
            dict(alibi=slopes8),
            dict(sinks=sinks8),
            dict(sinks=[8.0] * 8),                   # a sink that dominates the denominator
            dict(window=7, soft_cap=5.0, alibi=slopes8, sinks=sinks8, block_size=8),
            dict(num_layers=2, layer_windows=[3, 0], alibi=slopes8, block_size=32),
            dict(scale=0.02),
            dict(block_size=256),
            dict(block_size=8, window=9),
        ]
        for dtype in ("f32", "f16", "bf16"):
            for kw in cases:
                kw = dict(kw)
                layers = kw.get("num_layers", 1)
                m = tl.Model(hq=8, hkv=2, d=64, dtype=dtype, **kw)
                with self.subTest(model=repr(m)):
                    s = self.new_session(m)
                    self.exercise(s, rng, layers=layers)
                    s.close()

    def test_soft_cap_bites(self):
        """Large logits, so that the soft cap (not just the reference) decides the output."""
        rng = rng_for(self)
        for dtype in ("f32", "bf16"):
            m = tl.Model(hq=4, hkv=2, d=64, dtype=dtype, soft_cap=1.0)
            s = self.new_session(m)
            s.attend([(1, 0, 24)], rng=rng, q_amp=6.0)
            s.attend([(1, 24, 1), (2, 0, 9)], rng=rng, q_amp=6.0)
            self.assert_figures(s)
            s.close()

    def test_mixed_batch_and_multi_layer(self):
        rng = rng_for(self)
        m = tl.Model(num_layers=4, hq=8, hkv=2, d=64, dtype="f16", block_size=8,
                     layer_windows=[0, 6, 0, 11])
        s = self.new_session(m)
        for layer in range(4):
            s.attend([(100, 0, 30), (101, 0, 9)], layer=layer, rng=rng)
        # one call: a prefill chunk of a new sequence, decode tokens of two sequences, a chunk
        # continuing earlier context, and a chunk rolling a sequence back
        s.attend([(102, 0, 17), (100, 30, 1), (101, 9, 1)], layer=0, rng=rng)
        s.attend([(103, 0, 12), (100, 30, 5), (101, 4, 3)], layer=1, rng=rng)
        s.attend([(101, 9, 1), (100, 30, 1), (104, 0, 1), (105, 0, 2)], layer=2, rng=rng)
        # a sequence that exists at layer 3 only, and layers at different lengths
        s.attend([(106, 0, 19)], layer=3, rng=rng)
        self.assert_figures(s)
        for layer in range(4):
            s.probe(100, layer=layer, rng=rng)
        s.probe(106, layer=3, rng=rng)
        e = rpc_error(STUB.Attend, tl.Call(m, [(106, 1, 1)], rng).request(s.name, 0),
                      timeout=tl.RPC_TIMEOUT_S)
        self.assert_code(e, grpc.StatusCode.OUT_OF_RANGE)
        self.assert_figures(s)
        s.close()

    def test_rollback_and_retry(self):
        rng = rng_for(self)
        for dtype in ("f32", "f16", "bf16"):
            m = tl.Model(num_layers=2, hq=4, hkv=2, d=64, dtype=dtype, block_size=8)
            with self.subTest(dtype=dtype):
                s = self.new_session(m)
                s.attend([(7, 0, 20)], rng=rng)
                s.attend([(7, 0, 20)], layer=1, rng=rng)
                # the same call twice: identical bytes, same state
                call = tl.Call(m, [(7, 20, 3), (8, 0, 5)], rng)
                _, first = s.attend(None, call=call)
                fig1 = s.get()
                _, second = s.attend(None, call=call)
                self.assertEqual(first, second, "a retried call returned different bytes")
                fig2 = s.get()
                self.assertEqual(fig2.attend_calls, fig1.attend_calls + 1)
                fig2.attend_calls, fig2.backend_runs = fig1.attend_calls, fig1.backend_runs
                self.assertEqual(fig1, fig2)  # the cache's state is the same
                self.assert_figures(s)
                # roll back into the middle of a block and write something else
                s.attend([(7, 13, 2)], rng=rng)
                self.assert_figures(s)  # 15 tokens at layer 0, 20 at layer 1: 3 blocks
                s.probe(7, layer=1, rng=rng)
                # roll back to nothing at both layers: the blocks go back
                s.attend([(7, 0, 1)], layer=0, rng=rng)
                s.attend([(7, 0, 1)], layer=1, rng=rng)
                self.assert_figures(s)
                self.assertEqual(s.get().kv_used_tokens, 8 + 8)
                s.attend([(7, 1, 30)], layer=0, rng=rng)  # grow again after rollback
                s.probe(8, rng=rng)
                self.assert_figures(s)
                # a retried decode step after a rollback gives the same bytes as the first time
                call = tl.Call(m, [(7, 31, 1)], rng)
                _, a = s.attend(None, call=call)
                s.attend([(7, 31, 1)], rng=rng)   # something else at 31
                _, b = s.attend(None, call=call)  # the original step again
                self.assertEqual(a, b)
                s.close()

    def test_large_messages(self):
        """Megabyte tensors: the request arrives in many gRPC slices (and once gzip-compressed),
        the response leaves from the server's shared memory."""
        rng = rng_for(self)
        m = tl.Model(hq=4, hkv=2, d=64, dtype="f32")
        s = self.new_session(m, capacity=4096)
        _, raw = s.attend([(1, 0, 1024)], rng=rng)  # q 1 MiB, k and v 512 KiB each
        self.assertEqual(len(raw), 1 << 20)
        call = tl.Call(m, [(2, 0, 700), (1, 1024, 3)], rng)
        _, first = s.attend(None, call=call)
        resp = STUB.Attend(call.request(s.name, 0), timeout=tl.RPC_TIMEOUT_S,
                           compression=grpc.Compression.Gzip)
        self.assertEqual(resp.out, first)
        self.assert_figures(s)
        s.close()

    def test_block_boundaries(self):
        rng = rng_for(self)
        m = tl.Model(hq=4, hkv=1, d=64, dtype="bf16", block_size=8)
        s = self.new_session(m, capacity=128)
        for n in (7, 1, 1, 7, 8, 9):  # lengths 7, 8, 9, 16, 24, 33
            s.attend([(5, s.ref.seq_len(5, 0), n)], rng=rng)
            self.assert_figures(s)
        self.assertEqual(s.get().kv_used_tokens, 40)
        s.close()


# ---- errors ------------------------------------------------------------------------------------


class T3Errors(Base):
    """After every failing call: same figures, and the cached history of every sequence, read
    back through probes, exactly as before."""

    MODEL = dict(num_layers=2, hq=4, hkv=2, d=64, dtype="f16", block_size=8)

    def setUp(self):
        self.rng = rng_for(self)
        self.m = tl.Model(**self.MODEL)
        self.s = self.new_session(self.m, capacity=256)
        self.s.attend([(1, 0, 20), (2, 0, 5)], layer=0, rng=self.rng)
        self.s.attend([(1, 0, 11)], layer=1, rng=self.rng)
        self.assert_figures(self.s)

    def tearDown(self):
        try:
            self.s.close()
        except grpc.RpcError:
            pass

    def assert_unchanged(self):
        self.assert_figures(self.s)
        self.s.probe(1, layer=0, rng=self.rng)
        self.s.probe(1, layer=1, rng=self.rng)
        self.s.probe(2, layer=0, rng=self.rng)
        self.assert_figures(self.s)

    def attend_error(self, req, code, field=None):
        e = rpc_error(STUB.Attend, req, timeout=tl.RPC_TIMEOUT_S)
        self.assert_code(e, code, field)
        self.assert_unchanged()
        return e

    def req(self, chunks, layer=0, q=None, k=None, v=None, session=None):
        call = tl.Call(self.m, chunks, self.rng)
        r = call.request(session or self.s.name, layer)
        if q is not None:
            r.q = q
        if k is not None:
            r.k = k
        if v is not None:
            r.v = v
        return r

    def test_invalid_argument_attend(self):
        IA = grpc.StatusCode.INVALID_ARGUMENT
        ok = [(1, 3, 2), (2, 5, 1)]  # a valid rollback + decode, were the call not refused
        good = tl.Call(self.m, ok, self.rng)
        q, k, v = good.qb, good.kb, good.vb
        es = self.m.esize
        cases = [
            ("q one element short", self.req(ok, q=q[:-es]), "q"),
            ("q one row long", self.req(ok, q=q + q[:self.m.hq * self.m.d * es]), "q"),
            ("q odd byte count", self.req(ok, q=q + b"\0"), "q"),
            ("q missing", self.req(ok, q=b""), "q"),
            ("k short", self.req(ok, k=k[:-es]), "k"),
            ("k sized like q", self.req(ok, k=q), "k"),
            ("v long", self.req(ok, v=v + v), "v"),
            ("v missing", self.req(ok, v=b""), "v"),
            ("layer == num_layers", self.req(ok, layer=2), "layer"),
            ("layer 2^32-1", self.req(ok, layer=0xFFFFFFFF), "layer"),
            ("no chunks", pb.AttendRequest(session=self.s.name, layer=0), "chunks"),
            ("no chunks, tensors given",
             pb.AttendRequest(session=self.s.name, layer=0, q=q, k=k, v=v), "chunks"),
            ("zero-token chunk", self.req([(1, 3, 2), (3, 0, 0), (2, 5, 1)]), "num_tokens"),
            ("duplicate seq_id", self.req([(1, 3, 2), (2, 5, 1), (1, 20, 1)]), "seq_id"),
            ("duplicate seq_id, same chunk twice", self.req([(2, 5, 1), (2, 5, 1)]), "seq_id"),
            ("position limit", self.req([(1, 3, 2), (4, 0x7FFFFFFF, 1)]), "start_pos"),
        ]
        for what, req, field in cases:
            with self.subTest(what):
                self.attend_error(req, IA, field)
        # bytes that are not an AttendRequest at all
        raw = CHANNEL.unary_unary("/attnd.v1.Attention/Attend")
        for what, payload in (("truncated varint", b"\x10\xff"),
                              ("length past the end", b"\x0a\x40ab"),
                              ("bad wire type", b"\x0f")):
            with self.subTest(what):
                e = rpc_error(raw, payload, timeout=tl.RPC_TIMEOUT_S)
                self.assert_code(e, IA)
                self.assert_unchanged()

    def test_invalid_argument_create(self):
        IA = grpc.StatusCode.INVALID_ARGUMENT
        before = STUB.ListSessions(pb.ListSessionsRequest(), timeout=tl.RPC_TIMEOUT_S)

        def mc(**kw):
            base = dict(num_layers=2, hq=8, hkv=2, d=64, dtype="f32")
            base.update(kw)
            return tl.Model(**base).proto()

        nan, inf = float("nan"), float("inf")
        cases = [
            ("num_layers 0", mc(num_layers=0), 64, "num_layers"),
            ("no query heads", mc(hq=0), 64, "num_query_heads"),
            ("no kv heads", mc(hkv=0), 64, "num_kv_heads"),
            ("heads not a multiple", mc(hq=8, hkv=3), 64, "num_kv_heads"),
            ("head_dim 0", mc(d=0), 64, "head_dim"),
            ("head_dim 12", mc(d=12), 64, "head_dim"),
            ("head_dim 264", mc(d=264), 64, "head_dim"),
            ("dtype unspecified", pb.ModelConfig(num_layers=2, num_query_heads=8,
                                                 num_kv_heads=2, head_dim=64), 64, "dtype"),
            ("dtype 7", pb.ModelConfig(num_layers=2, num_query_heads=8, num_kv_heads=2,
                                       head_dim=64, dtype=7), 64, "dtype"),
            ("block_size 24", mc(block_size=24), 64, "block_size"),
            ("block_size 4", mc(block_size=4), 64, "block_size"),
            ("block_size 512", mc(block_size=512), 64, "block_size"),
            ("scale -1", mc(scale=-1.0), 64, "scale"),
            ("scale nan", mc(scale=nan), 64, "scale"),
            ("scale inf", mc(scale=inf), 64, "scale"),
            ("layer windows short", mc(layer_windows=[4]), 64, "layer_sliding_window"),
            ("layer windows long", mc(layer_windows=[4, 4, 4]), 64, "layer_sliding_window"),
            ("soft cap -1", mc(soft_cap=-1.0), 64, "logits_soft_cap"),
            ("soft cap nan", mc(soft_cap=nan), 64, "logits_soft_cap"),
            ("alibi short", mc(alibi=[0.5] * 7), 64, "alibi_slopes"),
            ("alibi inf", mc(alibi=[0.5] * 7 + [inf]), 64, "alibi_slopes"),
            ("sinks long", mc(sinks=[0.0] * 9), 64, "sinks"),
            ("sinks nan", mc(sinks=[0.0] * 7 + [nan]), 64, "sinks"),
            ("kv_capacity_tokens 0", mc(), 0, "kv_capacity_tokens"),
            ("model missing", None, 64, "model"),
        ]
        for what, model, cap, field in cases:
            with self.subTest(what):
                name = uname("bad")
                req = pb.CreateSessionRequest(session=name, kv_capacity_tokens=cap)
                if model is not None:
                    req.model.CopyFrom(model)
                e = rpc_error(STUB.CreateSession, req, timeout=tl.RPC_TIMEOUT_S)
                self.assert_code(e, IA, field)
                self.assert_code(rpc_error(STUB.GetSession, pb.GetSessionRequest(session=name),
                                           timeout=tl.RPC_TIMEOUT_S), grpc.StatusCode.NOT_FOUND)
        with self.subTest("unknown device"):
            e = rpc_error(STUB.CreateSession, pb.CreateSessionRequest(
                session=uname("dev"), model=mc(), kv_capacity_tokens=64, device="cuda:7"),
                timeout=tl.RPC_TIMEOUT_S)
            self.assert_code(e, IA, "device")
        for bad in ("", "has space", "x" * 129, "bad!name", "tab\tname", "caf\u00e9", "a,b"):
            with self.subTest(session=bad):
                e = rpc_error(STUB.CreateSession, pb.CreateSessionRequest(
                    session=bad, model=mc(), kv_capacity_tokens=64), timeout=tl.RPC_TIMEOUT_S)
                self.assert_code(e, IA, "session")
        with self.subTest("longest valid name"):
            name = "A-z0.9_:/" + "n" * 119
            self.assertEqual(len(name), 128)
            info = STUB.CreateSession(pb.CreateSessionRequest(
                session=name, model=mc(), kv_capacity_tokens=64), timeout=tl.RPC_TIMEOUT_S)
            self.assertEqual(info.session, name)
            STUB.CloseSession(pb.CloseSessionRequest(session=name), timeout=tl.RPC_TIMEOUT_S)
        after = STUB.ListSessions(pb.ListSessionsRequest(), timeout=tl.RPC_TIMEOUT_S)
        self.assertEqual([x.session for x in before.sessions],
                         [x.session for x in after.sessions])
        self.assert_unchanged()

    def test_not_found(self):
        NF = grpc.StatusCode.NOT_FOUND
        for name in (uname("nobody"), self.s.name.upper(), self.s.name + "x", "bad name!"):
            with self.subTest(session=name):
                self.attend_error(self.req([(1, 20, 1)], session=name), NF)
                for fn, req in ((STUB.GetSession, pb.GetSessionRequest(session=name)),
                                (STUB.Release, pb.ReleaseRequest(session=name, seq_ids=[1, 2])),
                                (STUB.CloseSession, pb.CloseSessionRequest(session=name))):
                    self.assert_code(rpc_error(fn, req, timeout=tl.RPC_TIMEOUT_S), NF)
                self.assert_unchanged()

    def test_out_of_range(self):
        OOR = grpc.StatusCode.OUT_OF_RANGE
        cases = [
            ("one past the end", [(1, 21, 1)], 0),
            ("unknown sequence at 1", [(9, 1, 1)], 0),
            ("past the end at layer 1", [(1, 12, 4)], 1),
            ("seq 2 unknown at layer 1", [(2, 1, 1)], 1),
            # the first chunk alone would roll sequence 1 back and create sequence 5: the call
            # must change nothing
            ("after valid chunks", [(1, 2, 3), (5, 0, 4), (2, 9, 1)], 0),
            ("far past the end", [(2, 1000, 2)], 0),
        ]
        for what, chunks, layer in cases:
            with self.subTest(what):
                e = self.attend_error(self.req(chunks, layer=layer), OOR)
                print("    OUT_OF_RANGE message: %s" % e.details())

    def test_resource_exhausted_kv_full(self):
        RE = grpc.StatusCode.RESOURCE_EXHAUSTED
        m = tl.Model(num_layers=2, hq=4, hkv=1, d=64, dtype="f32", block_size=16)
        s = self.new_session(m, capacity=64)  # 4 blocks
        rng = self.rng
        s.attend([(1, 0, 20)], rng=rng)      # 2 blocks
        self.assert_figures(s)

        def full(chunks, layer=0):
            e = rpc_error(STUB.Attend, tl.Call(m, chunks, rng).request(s.name, layer),
                          timeout=tl.RPC_TIMEOUT_S)
            self.assert_code(e, RE)
            self.assert_figures(s)
            s.probe(1, rng=rng)
            return e

        full([(2, 0, 80)])                   # 5 blocks alone
        full([(1, 0, 1), (2, 0, 70)])        # a rollback in the same call does not help enough
        full([(2, 0, 33)])                   # 3 blocks, 2 free
        full([(1, 20, 13), (2, 0, 17)])      # 1 + 2 blocks, 2 free
        full([(1, 0, 65)], layer=1)          # capacity is shared by the layers
        full([(3, 0, 40)], layer=1)
        s.attend([(2, 0, 32)], rng=rng)      # exactly full now
        self.assertEqual(s.get().kv_used_tokens, 64)
        self.assert_figures(s)
        full([(2, 32, 1)])
        full([(3, 0, 1)])
        s.attend([(2, 31, 1)], rng=rng)      # a retry inside the last block still fits
        s.attend([(1, 0, 20)], layer=1, rng=rng)  # so does another layer within held blocks
        self.assertEqual(s.release([1]), 1)
        s.attend([(2, 32, 1), (3, 0, 16)], rng=rng)  # room again
        self.assert_figures(s)
        self.assertEqual(s.get().kv_used_tokens, 64)
        s.close()
        self.assert_unchanged()

    def test_resource_exhausted_message_too_large(self):
        srv = tl.AttndServer(extra_args=["--max-message-mib", "1"]).start()
        try:
            ch = srv.channel()
            stub = tl.pb_grpc.AttentionStub(ch)
            m = tl.Model(hq=8, hkv=1, d=64, dtype="f32")  # q rows of 2 KiB
            s = self.new_session(m, stub=stub)
            s.attend([(1, 0, 10)], rng=self.rng)
            self.assert_figures(s)
            call = tl.Call(m, [(2, 0, 1024)], self.rng)  # q: 2 MiB, k and v: 256 KiB
            self.assertEqual(len(call.qb), 2 << 20)
            e = rpc_error(stub.Attend, call.request(s.name, 0), timeout=tl.RPC_TIMEOUT_S)
            self.assert_code(e, grpc.StatusCode.RESOURCE_EXHAUSTED)
            self.assert_figures(s)
            s.probe(1, rng=self.rng)
            s.attend([(2, 0, 100)], rng=self.rng)  # under the limit: fine
            self.assert_figures(s)
            h = tl.health_stub(ch)
            self.assertEqual(h.Check(health_pb.HealthCheckRequest(),
                                     timeout=tl.RPC_TIMEOUT_S).status,
                             health_pb.HealthCheckResponse.SERVING)
            rc = srv.stop()
            self.assertEqual(rc, 0, "second server exited %s:\n%s" % (rc, srv.log_text()))
        finally:
            srv.cleanup()

    BIG = dict(hq=8, hkv=8, d=128, dtype="f32")
    BIG_TOKENS = 1024

    def big_call(self, m, seq):
        # zeros are as slow to attend as anything else and cost nothing to make
        t = self.BIG_TOKENS
        z = np.zeros((t, m.hq, m.d))
        zk = np.zeros((t, m.hkv, m.d))
        return tl.Call(m, [(seq, 0, t)], q=z, k=zk, v=zk)

    def test_deadline_exceeded(self):
        m = tl.Model(**self.BIG)
        s = self.new_session(m, capacity=8192)
        s.attend([(1, 0, 9)], rng=self.rng)
        big = self.big_call(m, 50)
        for timeout in (0.001, 0.01):
            with self.subTest(timeout=timeout):
                e = rpc_error(STUB.Attend, big.request(s.name, 0), timeout=timeout)
                self.assert_code(e, grpc.StatusCode.DEADLINE_EXCEEDED)
                # the server may or may not have run it (the deadline may pass while it runs,
                # after it began); either way the session works, and seq 50 is its only trace
                released = s.release([50])
                self.assertIn(released, (0, 1))
                self.assert_figures(s)
                s.probe(1, rng=self.rng)
                s.attend([(1, s.ref.seq_len(1, 0), 1)], rng=self.rng)
        s.close()
        self.assert_unchanged()

    def test_cancelled(self):
        m = tl.Model(**self.BIG)
        s = self.new_session(m, capacity=8192)
        s.attend([(1, 0, 9)], rng=self.rng)
        futures = [STUB.Attend.future(self.big_call(m, 60 + i).request(s.name, 0),
                                      timeout=tl.RPC_TIMEOUT_S) for i in range(3)]
        time.sleep(0.05)  # let them reach the server (not asserted: any order is fine)
        for f in futures:
            f.cancel()
        for f in futures:
            try:
                f.result(timeout=tl.RPC_TIMEOUT_S)
                code = grpc.StatusCode.OK  # it finished before the cancel
            except grpc.FutureCancelledError:
                code = grpc.StatusCode.CANCELLED
            except grpc.RpcError as e:
                code = e.code()
            self.assertIn(code, (grpc.StatusCode.CANCELLED, grpc.StatusCode.OK))
        self.assertIn(s.release([60, 61, 62]), (0, 1, 2, 3))
        self.assert_figures(s)
        s.probe(1, rng=self.rng)
        s.attend([(1, 9, 3), (2, 0, 4)], rng=self.rng)
        self.assert_figures(s)
        h = tl.health_stub(CHANNEL)
        self.assertEqual(h.Check(health_pb.HealthCheckRequest(), timeout=tl.RPC_TIMEOUT_S).status,
                         health_pb.HealthCheckResponse.SERVING)
        s.close()
        self.assert_unchanged()


# ---- the wire: encodings other clients may produce ---------------------------------------------


class T6Wire(Base):
    """AttendRequest is parsed by hand-written wire code (service/svc_wire.c), not protobuf-c, so
    encodings that other protobuf implementations may send are checked here: any field order,
    unknown fields, repeated non-repeated fields (the last wins), overlong varints, explicit
    defaults, gzip. Each encodes one and the same call, which must return the same bytes as the
    canonical encoding (a retry at the same positions); malformed ones must change nothing."""

    def setUp(self):
        self.rng = rng_for(self)
        self.m = tl.Model(num_layers=2, hq=4, hkv=2, d=64, dtype="f16", block_size=8)
        self.s = self.new_session(self.m, capacity=2048)
        self.s.attend([(1, 0, 10)], layer=1, rng=self.rng)
        self.s.attend([(1, 0, 3)], layer=0, rng=self.rng)
        self.call = tl.Call(self.m, [(1, 10, 2), (2, 0, 3)], self.rng)
        _, self.want = self.s.attend(None, layer=1, call=self.call)
        self.raw = CHANNEL.unary_unary("/attnd.v1.Attention/Attend",
                                       response_deserializer=pb.AttendResponse.FromString)

    def tearDown(self):
        self.s.close()

    def fields(self):
        c = self.call
        return {
            "session": tl.pb_len(1, self.s.name.encode()),
            "layer": tl.pb_uint(2, 1),
            "chunk0": tl.pb_len(3, tl.pb_chunk(1, 10, 2)),
            "chunk1": tl.pb_len(3, tl.pb_chunk(2, 0, 3)),
            "q": tl.pb_len(4, c.qb),
            "k": tl.pb_len(5, c.kb),
            "v": tl.pb_len(6, c.vb),
        }

    def check_same(self, payload, **kw):
        resp = self.raw(payload, timeout=tl.RPC_TIMEOUT_S, **kw)
        self.assertEqual(resp.out, self.want)
        self.assert_figures(self.s)

    def test_canonical_matches_stub(self):
        f = self.fields()
        payload = b"".join(f[x] for x in ("session", "layer", "chunk0", "chunk1", "q", "k", "v"))
        self.assertEqual(payload, self.call.request(self.s.name, 1).SerializeToString())
        self.check_same(payload)

    def test_field_orders(self):
        f = self.fields()
        orders = [
            ("v", "k", "q", "chunk0", "chunk1", "layer", "session"),
            ("chunk0", "q", "layer", "chunk1", "k", "session", "v"),
            ("q", "k", "v", "session", "chunk0", "layer", "chunk1"),
        ]
        for order in orders:
            with self.subTest(order=order):
                self.check_same(b"".join(f[x] for x in order))

    def test_unknown_fields_skipped(self):
        f = self.fields()
        unknown = (tl.pb_uint(7, 12345) + tl.pb_tag(8, tl.WT_I64) + b"\1" * 8
                   + tl.pb_len(99, b"anything at all") + tl.pb_tag(1000, tl.WT_I32) + b"\2" * 4
                   + tl.pb_uint(536870911, 1))
        chunk_extra = tl.pb_uint(9, 7) + tl.pb_len(4, b"xyz")
        payload = (unknown + f["session"] + unknown + f["layer"]
                   + tl.pb_len(3, tl.pb_chunk(1, 10, 2, extra=chunk_extra)) + unknown
                   + f["chunk1"] + f["q"] + unknown + f["k"] + f["v"] + unknown)
        self.check_same(payload)

    def test_last_value_wins(self):
        f = self.fields()
        c = self.call
        payload = (tl.pb_len(1, b"no-such-session") + tl.pb_uint(2, 0) + tl.pb_len(4, b"junk")
                   + tl.pb_len(5, c.kb + c.kb) + f["session"] + f["layer"] + f["chunk0"]
                   + f["chunk1"] + f["q"] + f["k"] + f["v"])
        self.check_same(payload)
        # inside a chunk too
        payload = (f["session"] + f["layer"]
                   + tl.pb_len(3, tl.pb_uint(1, 77) + tl.pb_uint(3, 9) + tl.pb_chunk(1, 10, 2))
                   + f["chunk1"] + f["q"] + f["k"] + f["v"])
        self.check_same(payload)

    def test_explicit_defaults_and_overlong_varints(self):
        c = self.call
        payload = (tl.pb_len(1, self.s.name.encode()) + tl.pb_uint(2, 1, min_len=5)
                   + tl.pb_len(3, tl.pb_uint(1, 1, min_len=10) + tl.pb_uint(2, 10, min_len=3)
                               + tl.pb_uint(3, 2, min_len=2))
                   + tl.pb_len(3, tl.pb_chunk(2, 0, 3, order=(3, 2, 1), explicit_zero=True))
                   + tl.pb_len(4, c.qb) + tl.pb_len(5, c.kb) + tl.pb_len(6, c.vb))
        self.check_same(payload)
        # a uint32 field takes the low 32 bits of a wider varint, as protobuf does
        payload = (tl.pb_len(1, self.s.name.encode()) + tl.pb_uint(2, (5 << 32) | 1)
                   + tl.pb_len(3, tl.pb_chunk(1, (1 << 32) | 10, 2))
                   + tl.pb_len(3, tl.pb_chunk(2, 0, 3)) + tl.pb_len(4, c.qb)
                   + tl.pb_len(5, c.kb) + tl.pb_len(6, c.vb))
        self.check_same(payload)

    def test_gzip_compressed_request(self):
        req = self.call.request(self.s.name, 1)
        resp = STUB.Attend(req, timeout=tl.RPC_TIMEOUT_S, compression=grpc.Compression.Gzip)
        self.assertEqual(resp.out, self.want)
        self.assert_figures(self.s)

    def test_malformed(self):
        IA = grpc.StatusCode.INVALID_ARGUMENT
        f = self.fields()
        rest = f["chunk0"] + f["chunk1"] + f["q"] + f["k"] + f["v"]
        head = f["session"] + f["layer"]
        cases = [
            ("layer as bytes", f["session"] + tl.pb_len(2, b"\1") + rest, "layer"),
            ("q as a varint", head + f["chunk0"] + f["chunk1"] + tl.pb_uint(4, 3) + f["k"]
             + f["v"], "q"),
            ("num_tokens as bytes", head + tl.pb_len(3, tl.pb_uint(1, 1) + tl.pb_len(3, b"\2"))
             + f["q"] + f["k"] + f["v"], "num_tokens"),
            ("chunks as a varint", head + tl.pb_uint(3, 1) + rest, "chunks"),
            ("group", head + tl.pb_tag(9, tl.WT_GROUP_START) + tl.pb_tag(9, tl.WT_GROUP_END)
             + rest, None),
            ("wire type 6", head + tl.pb_tag(9, 6) + rest, None),
            ("field number 0", head + tl.pb_uint(0, 1) + rest, None),
            ("varint of 11 bytes", head + tl.pb_tag(7, tl.WT_VARINT) + b"\x80" * 10 + b"\0"
             + rest, None),
            ("q truncated", head + f["chunk0"] + f["chunk1"] + f["k"] + f["v"] + f["q"][:-1],
             None),
            ("chunk length past its end", head + tl.pb_tag(3, tl.WT_LEN) + tl.pb_varint(50)
             + tl.pb_chunk(1, 10, 2), None),
            ("session with a NUL", tl.pb_len(1, self.s.name.encode() + b"\0x") + f["layer"]
             + rest, "session"),
            ("session of 129 bytes", tl.pb_len(1, b"s" * 129) + f["layer"] + rest, "session"),
        ]
        for what, payload, field in cases:
            with self.subTest(what):
                e = rpc_error(self.raw, payload, timeout=tl.RPC_TIMEOUT_S)
                self.assert_code(e, IA, field)
                self.assert_figures(self.s)
        self.s.probe(1, layer=1, rng=self.rng)
        self.s.probe(2, layer=1, rng=self.rng)
        self.s.probe(1, layer=0, rng=self.rng)
        self.check_same(self.call.request(self.s.name, 1).SerializeToString())

    def test_many_chunks(self):
        """A decode step of 100 sequences in one call (duplicates found by sorting past 64)."""
        s = self.s
        s.attend([(100 + i, 0, 1 + i % 5) for i in range(100)], layer=0, rng=self.rng)
        s.attend([(100 + i, s.ref.seq_len(100 + i, 0), 1) for i in range(100)], layer=0,
                 rng=self.rng)
        self.assert_figures(s)
        chunks = [(100 + i, s.ref.seq_len(100 + i, 0), 1) for i in range(100)] + [(142, 0, 1)]
        e = rpc_error(STUB.Attend, tl.Call(self.m, chunks, self.rng).request(s.name, 0),
                      timeout=tl.RPC_TIMEOUT_S)
        self.assert_code(e, grpc.StatusCode.INVALID_ARGUMENT, "seq_id")
        self.assert_figures(s)
        s.probe(142, layer=0, rng=self.rng)
        s.probe(199, layer=0, rng=self.rng)


class T7Races(Base):
    def test_concurrent_create_same_name(self):
        """Clients creating one session at once all end with the same SessionInfo (a creation in
        progress may answer UNAVAILABLE: retry)."""
        name = uname("race")
        m = tl.Model(num_layers=2, hq=8, hkv=2, d=64, dtype="bf16")
        req = pb.CreateSessionRequest(session=name, model=m.proto(), kv_capacity_tokens=256)
        infos, lock = [], threading.Lock()

        def creator():
            stub = tl.pb_grpc.AttentionStub(SERVER.channel())
            for _ in range(200):
                try:
                    info = stub.CreateSession(req, timeout=tl.RPC_TIMEOUT_S)
                    break
                except grpc.RpcError as e:
                    if e.code() != grpc.StatusCode.UNAVAILABLE:
                        raise
                    time.sleep(0.01)
            else:
                raise AssertionError("CreateSession answered UNAVAILABLE 200 times")
            with lock:
                infos.append(info)

        errors = tl.run_threads([creator] * 6, timeout=max(120.0, tl.RPC_TIMEOUT_S))
        self.assertEqual(errors, [], "\n".join(errors))
        self.assertEqual(len(infos), 6)
        for info in infos[1:]:
            self.assertEqual(info, infos[0])
        s = tl.Session(STUB, name, m)
        s.attend([(1, 0, 4)], rng=rng_for(self))
        self.assert_figures(s)
        s.close()

    def test_close_with_calls_in_flight(self):
        """CloseSession while Attend calls of the session are on their way: each call either
        completes correctly or answers NOT_FOUND; nothing hangs; the name is free afterwards."""
        m = tl.Model(hq=4, hkv=1, d=64, dtype="f32")
        s = self.new_session(m)
        rng = rng_for(self)
        calls = [tl.Call(m, [(i, 0, 64)], rng) for i in range(6)]
        futures = [STUB.Attend.future(c.request(s.name, 0), timeout=tl.RPC_TIMEOUT_S)
                   for c in calls]
        s.close()
        outcomes = []
        for c, f in zip(calls, futures):
            try:
                resp = f.result(timeout=tl.RPC_TIMEOUT_S + 30)
            except grpc.FutureTimeoutError:
                self.fail("an Attend call racing CloseSession never ended")
            except grpc.RpcError as e:
                self.assertEqual(e.code(), grpc.StatusCode.NOT_FOUND, e.details())
                outcomes.append("NOT_FOUND")
                continue
            got = tl.from_bytes(resp.out, m.dtype, (c.tokens, m.hq, m.d))
            want = tl.Reference(m).run(0, c.chunks, c.q, c.k, c.v)
            self.assertIsNone(tl.mismatch(got, want, m.dtype))
            outcomes.append("OK")
        print("    outcomes: %s" % outcomes)
        self.assert_code(rpc_error(STUB.GetSession, pb.GetSessionRequest(session=s.name),
                                   timeout=tl.RPC_TIMEOUT_S), grpc.StatusCode.NOT_FOUND)
        s2 = tl.Session(STUB, s.name, m).create()
        self.assertEqual((s2.info.num_sequences, s2.info.kv_used_tokens), (0, 0))
        s2.close()


# ---- back-pressure -----------------------------------------------------------------------------


class T8Backpressure(Base):
    def test_overload_then_retry(self):
        """A server with a device queue of 1: calls may be refused with UNAVAILABLE (back off and
        retry, says the contract); a refused call changes nothing, and every call retried until
        it is accepted returns the right output."""
        srv = tl.AttndServer(extra_args=["--max-queue", "1", "--arena-mib", "16",
                                         "--max-message-mib", "8"]).start()
        try:
            stub0 = tl.pb_grpc.AttentionStub(srv.channel())
            m = tl.Model(num_layers=2, hq=8, hkv=2, d=64, dtype="bf16", block_size=8)
            name = uname("busy")
            tl.Session(stub0, name, m, capacity=16384).create()
            seeds = rng_for(self).integers(0, 1 << 31, size=6)
            refused = [0] * len(seeds)
            views = []

            def client(ci):
                rng = np.random.default_rng(int(seeds[ci]))
                v = tl.Session(tl.pb_grpc.AttentionStub(srv.channel()), name, m)
                views.append(v)
                for n in range(10):
                    layer = n % 2
                    seq = ci * 100 + n // 4
                    chunks = [(seq, v.ref.seq_len(seq, layer), int(rng.integers(1, 40)))]
                    call = tl.Call(m, chunks, rng)
                    for _ in range(1000):
                        try:
                            v.attend(None, layer=layer, call=call)
                            break
                        except grpc.RpcError as e:
                            if e.code() != grpc.StatusCode.UNAVAILABLE:
                                raise
                            refused[ci] += 1
                            time.sleep(0.002 + 0.01 * rng.random())
                    else:
                        raise AssertionError("refused 1000 times in a row")

            errors = tl.run_threads([lambda ci=ci: client(ci) for ci in range(len(seeds))],
                                    timeout=max(300.0, tl.RPC_TIMEOUT_S * 2))
            self.assertEqual(errors, [], "\n".join(errors))
            print("    UNAVAILABLE answers, retried: %d" % sum(refused))
            # the clients' sequences are disjoint: the session holds the sum of their figures
            info = stub0.GetSession(pb.GetSessionRequest(session=name), timeout=tl.RPC_TIMEOUT_S)
            self.assertEqual(info.kv_used_tokens, sum(v.ref.kv_used_tokens() for v in views))
            self.assertEqual(info.num_sequences, sum(v.ref.num_sequences() for v in views))
            for v in views:
                for seq in list(v.ref.seqs)[:2]:
                    v.probe(seq, layer=0)
            rc = srv.stop()
            self.assertEqual(rc, 0, "attnd serve exited %s:\n%s" % (rc, srv.log_text()))
        finally:
            srv.cleanup()

    def test_call_larger_than_tensor_memory(self):
        """A server whose shared tensor memory is under twice its message limit refuses to
        start, so no call that passes the message limit can outgrow the arena. A call too large
        (20 MiB of tensors against --arena-mib 16 --max-message-mib 8) is RESOURCE_EXHAUSTED,
        not UNAVAILABLE (retrying cannot help), and changes nothing; the server carries on."""
        bad = tl.AttndServer(extra_args=["--arena-mib", "16"])
        self.assertNotEqual(bad.start_expecting_failure(), 0)
        srv = tl.AttndServer(extra_args=["--arena-mib", "16", "--max-message-mib", "8"]).start()
        try:
            stub = tl.pb_grpc.AttentionStub(srv.channel())
            m = tl.Model(hq=8, hkv=8, d=128, dtype="f32")  # rows of 4 KiB for q, k, v and out
            s = self.new_session(m, capacity=8192, stub=stub)
            rng = rng_for(self)
            s.attend([(1, 0, 40)], rng=rng)
            t = 1280  # q, k, v and out of 5 MiB each: 20 MiB of tensors
            z = np.zeros((t, m.hq, m.d))
            call = tl.Call(m, [(1, 40, t)], q=z, k=z, v=z)
            for _ in range(2):
                e = rpc_error(stub.Attend, call.request(s.name, 0), timeout=tl.RPC_TIMEOUT_S)
                print("    %s: %s" % (e.code().name, e.details()))
                self.assertEqual(e.code(), grpc.StatusCode.RESOURCE_EXHAUSTED)
                self.assert_figures(s)
                s.probe(1, rng=rng)
            s.attend([(1, 40, 500)], rng=rng)  # 8 MiB in all: fits
            self.assert_figures(s)
            rc = srv.stop()
            self.assertEqual(rc, 0, "attnd serve exited %s:\n%s" % (rc, srv.log_text()))
        finally:
            srv.cleanup()


# ---- many clients at once ----------------------------------------------------------------------

CONCURRENT_MODELS = [
    dict(num_layers=2, hq=4, hkv=4, d=64, dtype="f32"),
    dict(num_layers=1, hq=8, hkv=2, d=128, dtype="f16", window=12),
    dict(num_layers=2, hq=8, hkv=1, d=80, dtype="bf16", block_size=8, sinks=[0.5] * 8),
    dict(num_layers=1, hq=4, hkv=1, d=64, dtype="f32", alibi=[0.25, 0.125, 0.0625, 0.03125],
         soft_cap=4.0, block_size=32),
]


class T9Batching(Base):
    def batched_round(self, srv, clients, rounds, bad_client=None):
        """`clients` threads, each on its own channel and sequences of one shared session, start
        each round together (a barrier) so their calls queue up at once: a prefill round, then
        decode rounds alternating layers. Every output is checked against the reference.
        bad_client's call in round 1 starts past its sequence's end: it alone is OUT_OF_RANGE.
        Returns the session's info and the number of calls that succeeded."""
        m = tl.Model(num_layers=2, hq=8, hkv=2, d=64, dtype="bf16", block_size=8)
        name = uname("batch")
        stub0 = tl.pb_grpc.AttentionStub(srv.channel())
        tl.Session(stub0, name, m, capacity=16384).create()
        seeds = rng_for(self).integers(0, 1 << 31, size=clients)
        views = [tl.Session(tl.pb_grpc.AttentionStub(srv.channel()), name, m)
                 for _ in range(clients)]
        barrier = threading.Barrier(clients)
        ok = [0] * clients

        def client(ci):
            rng = np.random.default_rng(int(seeds[ci]))
            v = views[ci]
            seq = 1000 + ci
            for r in range(rounds):
                layer = 0 if r == 0 else r % 2
                if r == 0:
                    chunks = [(seq, 0, 20 + ci)]
                else:
                    chunks = [(seq, v.ref.seq_len(seq, layer), 1)]
                barrier.wait(timeout=60)
                if r == 1 and ci == bad_client:
                    call = tl.Call(m, [(seq, v.ref.seq_len(seq, layer) + 5, 1)], rng)
                    err = rpc_error(v.raw_attend, call, layer=layer)
                    self.assert_code(err, grpc.StatusCode.OUT_OF_RANGE)
                    continue
                v.attend(chunks, layer=layer, rng=rng)
                ok[ci] += 1

        errors = tl.run_threads([lambda ci=ci: client(ci) for ci in range(clients)],
                                timeout=max(300.0, tl.RPC_TIMEOUT_S * 2))
        self.assertEqual(errors, [], "\n".join(errors))
        info = stub0.GetSession(pb.GetSessionRequest(session=name), timeout=tl.RPC_TIMEOUT_S)
        self.assertEqual(info.kv_used_tokens, sum(v.ref.kv_used_tokens() for v in views))
        self.assertEqual(info.num_sequences, sum(v.ref.num_sequences() for v in views))
        return info, sum(ok)

    def test_queued_calls_merge_and_each_gets_its_answer(self):
        """With a queueing delay long enough for a round of concurrent calls to meet, calls of
        one session and layer over distinct sequences run merged: fewer device runs than calls
        (GetSession's backend_runs vs attend_calls), every output still exact, and a bad call
        in a merged round fails alone."""
        srv = tl.AttndServer(cpu_threads=1, extra_args=["--batch-delay-us", "500000"]).start()
        try:
            info, calls = self.batched_round(srv, clients=6, rounds=5, bad_client=2)
            print("    %d calls in %d device runs" % (info.attend_calls, info.backend_runs))
            self.assertEqual(info.attend_calls, calls)
            self.assertLess(info.backend_runs, info.attend_calls)
            self.assertGreaterEqual(info.backend_runs, 5)  # rounds never merge: a barrier apart
            self.assertEqual(srv.stop(), 0, srv.log_text())
        finally:
            srv.cleanup()

    def test_token_budget_bounds_a_batch(self):
        """--batch-tokens 60 with prefill calls of 20-25 tokens: at most two calls share a run in
        the prefill round; decode calls (1 token) merge more."""
        srv = tl.AttndServer(cpu_threads=1, extra_args=["--batch-delay-us", "500000",
                                                        "--batch-tokens", "60"]).start()
        try:
            info, calls = self.batched_round(srv, clients=6, rounds=1)
            print("    %d calls in %d device runs" % (info.attend_calls, info.backend_runs))
            self.assertEqual(info.attend_calls, 6)
            self.assertGreaterEqual(info.backend_runs, 3)
            self.assertLess(info.backend_runs, 6)
            self.assertEqual(srv.stop(), 0, srv.log_text())
        finally:
            srv.cleanup()

    def test_batching_off(self):
        """--batch-tokens 0: every call is a run of its own."""
        srv = tl.AttndServer(cpu_threads=1, extra_args=["--batch-tokens", "0"]).start()
        try:
            info, calls = self.batched_round(srv, clients=4, rounds=3)
            self.assertEqual(info.attend_calls, calls)
            self.assertEqual(info.backend_runs, calls)
            self.assertEqual(srv.stop(), 0, srv.log_text())
        finally:
            srv.cleanup()


class T4Concurrency(Base):
    CLIENTS = 8
    CALLS = 20

    def test_concurrent_clients(self):
        sessions = [self.new_session(tl.Model(**kw), capacity=16384, tag="conc")
                    for kw in CONCURRENT_MODELS]
        base_rng = rng_for(self)
        seeds = base_rng.integers(0, 1 << 31, size=self.CLIENTS)

        def client(ci):
            rng = np.random.default_rng(int(seeds[ci]))
            ch = SERVER.channel()
            stub = tl.pb_grpc.AttentionStub(ch)
            # this client's view of two sessions: its own sequences, its own reference
            mine = []
            for si in (ci % len(sessions), (ci + 1 + ci // len(sessions)) % len(sessions)):
                v = tl.Session(stub, sessions[si].name, sessions[si].model)
                mine.append(v)
            next_seq = [ci * 1000]
            for n in range(self.CALLS):
                v = mine[n % 2]
                m = v.model
                layer = int(rng.integers(0, m.num_layers))
                known = [sq for sq in v.ref.seqs if v.ref.seq_len(sq, layer) > 0]
                chunks = []
                op = int(rng.integers(0, 4))
                if op == 0 or not known:  # a new sequence's prefill
                    next_seq[0] += 1
                    chunks.append((next_seq[0], 0, int(rng.integers(1, 17))))
                if known and op in (1, 2):  # decode steps, plus maybe a new prefill
                    for sq in rng.permutation(known)[:int(rng.integers(1, 4))]:
                        chunks.append((int(sq), v.ref.seq_len(int(sq), layer), 1))
                    if op == 2:
                        next_seq[0] += 1
                        chunks.append((next_seq[0], 0, int(rng.integers(1, 9))))
                if known and op == 3:  # rollback / retry somewhere inside a sequence
                    sq = int(rng.choice(known))
                    start = int(rng.integers(0, v.ref.seq_len(sq, layer) + 1))
                    chunks.append((sq, start, int(rng.integers(1, 6))))
                v.attend(chunks, layer=layer, rng=rng)
            for v in mine:
                ids = list(v.ref.seqs)
                got = v.stub.Release(pb.ReleaseRequest(session=v.name, seq_ids=ids),
                                     timeout=tl.RPC_TIMEOUT_S).released
                if got != len(ids):
                    raise AssertionError("client %d released %d of its %d sequences"
                                         % (ci, got, len(ids)))
            ch.close()

        errors = tl.run_threads([lambda ci=ci: client(ci) for ci in range(self.CLIENTS)],
                                timeout=max(300.0, tl.RPC_TIMEOUT_S * 2))
        self.assertEqual(errors, [], "\n".join(errors))
        for s in sessions:
            info = s.get()
            self.assertEqual((info.num_sequences, info.kv_used_tokens), (0, 0), s.name)
            s.close()


# ---- SIGTERM with calls in flight --------------------------------------------------------------


class T5Shutdown(Base):
    def test_sigterm_tells_health_watchers(self):
        """On SIGTERM a watcher gets NOT_SERVING, then its stream ends with UNAVAILABLE, and it
        does not hold the shutdown for the grace period (60 s here)."""
        srv = tl.AttndServer(extra_args=["--grace-ms", "60000"]).start()
        try:
            h = tl.health_stub(srv.channel())
            streams = [h.Watch(health_pb.HealthCheckRequest(service=svc),
                               timeout=tl.RPC_TIMEOUT_S) for svc in ("", "attnd.v1.Attention")]
            for st in streams:
                self.assertEqual(next(st).status, health_pb.HealthCheckResponse.SERVING)
            srv.signal_term()
            for st in streams:
                self.assertEqual(next(st).status, health_pb.HealthCheckResponse.NOT_SERVING)
                e = rpc_error(next, st)
                self.assert_code(e, grpc.StatusCode.UNAVAILABLE)
            rc = srv.wait(tl.STOP_TIMEOUT_S)
            self.assertEqual(rc, 0, "attnd serve exited %s:\n%s" % (rc, srv.log_text()))
            self.assertNotIn("grace period over", srv.log_text(),
                             "the watchers held the shutdown until the grace period ran out")
        finally:
            srv.cleanup()

    def test_sigterm_with_calls_in_flight(self):
        srv = tl.AttndServer(extra_args=["--grace-ms", "60000"]).start()
        try:
            ch = srv.channel()
            stub = tl.pb_grpc.AttentionStub(ch)
            m = tl.Model(hq=8, hkv=2, d=128, dtype="f32")
            s = self.new_session(m, capacity=16384, stub=stub)
            rng = rng_for(self)
            # Calls with real work (random q and k) but a cheap exact answer: every value row of
            # a KV head is the same vector, so every query head's output is that vector.
            t = 768
            calls, wants = [], []
            for i in range(6):
                c_row = rng.standard_normal((m.hkv, m.d))
                v = np.broadcast_to(c_row, (t, m.hkv, m.d))
                call = tl.Call(m, [(i, 0, t)], rng, v=v)
                calls.append(call)
                wants.append(np.broadcast_to(np.repeat(call.v[0], m.hq // m.hkv, axis=0),
                                             (t, m.hq, m.d)))
            futures = [stub.Attend.future(c.request(s.name, 0), timeout=tl.RPC_TIMEOUT_S)
                       for c in calls]
            time.sleep(0.05)  # most of them reach the server; not asserted
            srv.signal_term()
            codes, details = [], []
            for want, f in zip(wants, futures):
                try:
                    resp = f.result(timeout=tl.RPC_TIMEOUT_S + 30)
                except grpc.FutureTimeoutError:
                    self.fail("a call in flight at SIGTERM never ended")
                except grpc.RpcError as e:
                    codes.append(e.code())
                    details.append("%s: %s" % (e.code().name, e.details()))
                    continue
                codes.append(grpc.StatusCode.OK)
                got = tl.from_bytes(resp.out, m.dtype, want.shape)
                err = tl.mismatch(got, want, m.dtype)
                self.assertIsNone(err, "a call completed during the drain: %s" % err)
            print("    call outcomes across SIGTERM: %s %s" % ([c.name for c in codes], details))
            for code in codes:
                self.assertIn(code, (grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE,
                                     grpc.StatusCode.CANCELLED))
            rc = srv.wait(tl.STOP_TIMEOUT_S)
            self.assertIsNotNone(rc, "attnd serve did not exit after SIGTERM:\n%s"
                                 % srv.log_text())
            self.assertEqual(rc, 0, "attnd serve exited %s:\n%s" % (rc, srv.log_text()))
            srv.stop()
        finally:
            srv.cleanup()


if __name__ == "__main__":
    tl.main()
