#!/usr/bin/env python3
"""attnd end to end, the worker pool and tenants: Python gRPC clients against real `attnd serve`
processes (one per test class, each with the options it tests).

    ATTND_BIN=build/service/attnd ATTND_PY=build/py python3 tests/service/test_tenants.py

Every Attend output is checked against the float64 NumPy reference of tests/service/
attnd_testlib.py. No assertion depends on timing. Randomized tests print their seed first; set
ATTND_TEST_SEED=N to replay a run. The last line is `N passed, M failed`."""
import hashlib
import json
import os
import signal
import sys
import threading
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


def digest(token):
    return hashlib.sha256(token.encode()).hexdigest()


def write_tenants(path, tenants):
    """tenants: [(name, weight, [tokens], quotas or None)]. Written whole, then renamed in, so a
    reload never reads half a file."""
    doc = {"version": 1, "tenants": []}
    for name, weight, tokens, quotas in tenants:
        t = {"name": name, "weight": weight, "tokens_sha256": [digest(x) for x in tokens]}
        if quotas:
            t["quotas"] = quotas
        doc["tenants"].append(t)
    with open(path + ".tmp", "w") as f:
        json.dump(doc, f)
    os.replace(path + ".tmp", path)


def md(token):
    return [("authorization", "Bearer " + token)]


class AuthSession(tl.Session):
    """A Session whose calls carry a bearer token."""

    def __init__(self, stub, name, model, token, capacity=4096):
        super().__init__(stub, name, model, capacity)
        self.token = token

    def create(self, timeout=tl.RPC_TIMEOUT_S):
        self.info = self.stub.CreateSession(
            pb.CreateSessionRequest(session=self.name, model=self.model.proto(),
                                    kv_capacity_tokens=self.capacity),
            metadata=md(self.token), timeout=timeout)
        return self

    def raw_attend(self, call, layer=0, timeout=tl.RPC_TIMEOUT_S):
        resp = self.stub.Attend(call.request(self.name, layer), metadata=md(self.token),
                                timeout=timeout)
        m = self.model
        return tl.from_bytes(resp.out, m.dtype, (call.tokens, m.hq, m.d)), resp.out


def stats(stub, token):
    return stub.GetStats(pb.GetStatsRequest(), metadata=md(token),
                         timeout=tl.RPC_TIMEOUT_S).tenants[0]


class TToken(unittest.TestCase):
    """`attnd token` makes a token and the digest line that opens it; --config takes the tenants
    file and the worker count as JSON keys; without a tenants file a non-loopback address is
    refused; a missing tenants file stops the server from starting."""

    def test_token_config_and_listen_policy(self):
        out = tl.subprocess.run([tl.ATTND_BIN, "token"], capture_output=True, text=True,
                                timeout=60, check=True).stdout.splitlines()
        self.assertEqual(len(out), 2, out)
        token, line = out
        self.assertTrue(token.startswith("atk_") and len(token) == 47, token)
        self.assertEqual(line, '"%s"' % digest(token))
        again = tl.subprocess.run([tl.ATTND_BIN, "token"], capture_output=True, text=True,
                                  timeout=60, check=True).stdout.splitlines()[0]
        self.assertNotEqual(again, token)
        d = tl.tempfile.mkdtemp(prefix="attnd-token-")
        path = os.path.join(d, "tenants.json")
        with open(path, "w") as f:
            f.write('{"version": 1, "tenants": [{"name": "t", "tokens_sha256": [%s]}]}' % line)
        config = os.path.join(d, "config.json")
        with open(config, "w") as f:
            json.dump({"tenants": path, "workers_per_device": 2}, f)
        srv = tl.AttndServer(extra_args=["--config", config], log_level="info").start()
        try:
            stub = tl.pb_grpc.AttentionStub(srv.channel())
            self.assertEqual(stats(stub, token).tenant, "t")
            with self.assertRaises(grpc.RpcError) as cm:
                stats(stub, again)
            self.assertEqual(cm.exception.code(), grpc.StatusCode.UNAUTHENTICATED)
            self.assertEqual(srv.stop(), 0, srv.log_text())
            self.assertEqual(srv.log_text().count("worker: cpu: ready"), 2)
        finally:
            srv.cleanup()
        open_srv = tl.AttndServer(extra_args=["--listen", "192.0.2.1:0"])
        self.assertEqual(open_srv.start_expecting_failure(), 2)
        open_srv.cleanup()
        bad = tl.AttndServer(extra_args=["--tenants", os.path.join(d, "missing.json")])
        self.assertEqual(bad.start_expecting_failure(), 2)
        bad.cleanup()


class TReload(unittest.TestCase):
    """SIGHUP reloads the tenants file while calls run: none is dropped, a new token works at
    once, a removed one fails, the tenants that stay keep their sessions and counters, and a bad
    file changes nothing."""

    def test_sighup_mid_traffic(self):
        d = tl.tempfile.mkdtemp(prefix="attnd-tenants-")
        path = os.path.join(d, "tenants.json")
        write_tenants(path, [("alpha", 1, ["atk_a1"], None), ("beta", 1, ["atk_b"], None)])
        srv = tl.AttndServer(extra_args=["--tenants", path], log_level="info").start()
        try:
            stub = tl.pb_grpc.AttentionStub(srv.channel())
            m = tl.Model(num_layers=1, hq=4, hkv=2, d=64, dtype="bf16")
            sa = AuthSession(stub, "s", m, "atk_a1", capacity=8192).create()
            sb = AuthSession(stub, "s", m, "atk_b", capacity=8192).create()  # beta's own "s"
            seeds = rng_for(self).integers(0, 1 << 31, size=4)
            stop = threading.Event()
            outcomes = {"alpha": [], "beta": []}

            def traffic(sess, who, seed, seq):
                rng = np.random.default_rng(int(seed))
                v = AuthSession(tl.pb_grpc.AttentionStub(srv.channel()), sess.name, m,
                                sess.token)
                n = 0
                while not stop.is_set() and n < 2000:
                    try:
                        v.attend([(seq, v.ref.seq_len(seq, 0), 1)], rng=rng)
                        outcomes[who].append("OK")
                    except grpc.RpcError as e:
                        outcomes[who].append(e.code().name)
                        if e.code() == grpc.StatusCode.UNAUTHENTICATED:
                            return  # the token was removed: expected for alpha only
                        raise
                    n += 1

            threads = [(sa, "alpha", seeds[0], 1), (sa, "alpha", seeds[1], 2),
                       (sb, "beta", seeds[2], 1), (sb, "beta", seeds[3], 2)]
            runner = threading.Thread(target=lambda: outcomes.setdefault("errors", tl.run_threads(
                [lambda t=t: traffic(*t) for t in threads], timeout=300.0)))
            runner.start()
            while len(outcomes["alpha"]) < 20 or len(outcomes["beta"]) < 20:
                time.sleep(0.01)  # traffic is flowing (not asserted on time)
            before = stats(stub, "atk_b")
            write_tenants(path, [("alpha", 2, ["atk_a2"], None), ("beta", 1, ["atk_b"], None),
                                 ("gamma", 1, ["atk_g"], {"sessions": 1})])
            srv.proc.send_signal(signal.SIGHUP)
            for _ in range(3000):  # the reload is asynchronous: wait until it shows
                try:
                    a = stats(stub, "atk_a2")
                    break
                except grpc.RpcError as e:
                    self.assertEqual(e.code(), grpc.StatusCode.UNAUTHENTICATED)
                    time.sleep(0.01)
            else:
                self.fail("the new token never worked:\n" + srv.log_text())
            self.assertEqual((a.tenant, a.weight, a.sessions), ("alpha", 2, 1))
            with self.assertRaises(grpc.RpcError) as cm:
                stats(stub, "atk_a1")
            self.assertEqual(cm.exception.code(), grpc.StatusCode.UNAUTHENTICATED)
            self.assertEqual(stats(stub, "atk_g").tenant, "gamma")
            # alpha's session is still alpha's, under its new token
            info = stub.GetSession(pb.GetSessionRequest(session="s"), metadata=md("atk_a2"),
                                   timeout=tl.RPC_TIMEOUT_S)
            self.assertEqual(info.session, "s")
            # a broken file: logged, the table stays
            with open(path, "w") as f:
                f.write("{\"version\": 1, \"tenants\": [")
            srv.proc.send_signal(signal.SIGHUP)
            for _ in range(3000):
                if "not reloaded" in srv.log_text():
                    break
                time.sleep(0.01)
            self.assertIn("not reloaded", srv.log_text())
            self.assertEqual(stats(stub, "atk_a2").tenant, "alpha")
            stop.set()
            runner.join(300)
            self.assertEqual(outcomes.get("errors"), [], "\n".join(outcomes.get("errors") or []))
            # no call was dropped: beta never failed; alpha only stopped at the removed token
            self.assertEqual(set(outcomes["beta"]), {"OK"})
            self.assertEqual(set(outcomes["alpha"]) - {"OK"}, {"UNAUTHENTICATED"})
            after = stats(stub, "atk_b")
            self.assertGreater(after.calls, before.calls)  # counters kept across reloads
            self.assertEqual(srv.stop(), 0, srv.log_text())
        finally:
            srv.cleanup()


class TFairShare(unittest.TestCase):
    """A flooding tenant (weight 1, 16 clients) and a quiet one (weight 3, 12 clients) on a
    one-thread CPU device: every call of the quiet tenant completes, and while both keep the
    device busy, the quiet tenant's share of the completed work (tokens x context, GetStats'
    `work`) is 3/4 within 0.05 (arrival order would give it about 12/28 = 0.43; equal weights
    give 0.50). Each call is a 512-token prefill at position 0 (work 512 x 512, four scheduler
    quanta), expensive enough that each quiet client's next call is queued long before the
    device could run out of quiet work. 0.05 covers the calls that finish between the two
    tenants' stats snapshots and the ends of the window. No assertion is about time."""

    FLOOD, QUIET, QUIET_CALLS, T = 16, 12, 16, 512

    def test_completed_work_follows_the_weights(self):
        d = tl.tempfile.mkdtemp(prefix="attnd-fair-")
        path = os.path.join(d, "tenants.json")
        write_tenants(path, [("flood", 1, ["atk_flood"], None),
                             ("quiet", 3, ["atk_quiet"], None)])
        srv = tl.AttndServer(cpu_threads=1, extra_args=["--tenants", path]).start()
        try:
            stub = tl.pb_grpc.AttentionStub(srv.channel())
            m = tl.Model(num_layers=1, hq=4, hkv=1, d=64, dtype="bf16")
            clients = [("atk_flood", i) for i in range(self.FLOOD)] + \
                      [("atk_quiet", i) for i in range(self.QUIET)]
            for token, i in clients:
                AuthSession(stub, "c%d" % i, m, token, capacity=self.T).create()
            rng = rng_for(self)
            call = tl.Call(m, [(1, 0, self.T)], rng)
            quiet_done = [0] * self.QUIET
            stop = threading.Event()
            window = {}
            lock = threading.Lock()

            def client(token, i):
                v = tl.pb_grpc.AttentionStub(srv.channel())
                req = call.request("c%d" % i, 0)
                n = 0
                while not stop.is_set():
                    v.Attend(req, metadata=md(token), timeout=tl.RPC_TIMEOUT_S)
                    if token == "atk_quiet":
                        n += 1
                        with lock:
                            quiet_done[i] = n
                            if "start" not in window and min(quiet_done) >= 3:
                                window["start"] = (stats(stub, "atk_flood").work,
                                                   stats(stub, "atk_quiet").work)
                            if n == self.QUIET_CALLS:
                                if "end" not in window:
                                    window["end"] = (stats(stub, "atk_flood").work,
                                                     stats(stub, "atk_quiet").work)
                                return

            def quiet_then_stop(token, i):
                try:
                    client(token, i)
                finally:
                    if all(q >= self.QUIET_CALLS for q in quiet_done):
                        stop.set()

            errors = tl.run_threads([lambda c=c: quiet_then_stop(*c) for c in clients],
                                    timeout=max(600.0, tl.RPC_TIMEOUT_S * 4))
            stop.set()
            self.assertEqual(errors, [], "\n".join(errors))
            self.assertEqual(quiet_done, [self.QUIET_CALLS] * self.QUIET)
            flood = window["end"][0] - window["start"][0]
            quiet = window["end"][1] - window["start"][1]
            share = quiet / (quiet + flood)
            print("    work in the window: flood %d, quiet %d: quiet share %.3f (ideal 0.750)"
                  % (flood, quiet, share))
            self.assertGreater(flood, 0)  # the flood was served too, just less
            self.assertAlmostEqual(share, 0.75, delta=0.05)
            f, q = stats(stub, "atk_flood"), stats(stub, "atk_quiet")
            self.assertEqual(q.work, self.QUIET * self.QUIET_CALLS * self.T * self.T)
            self.assertGreater(f.queue_ns / max(f.calls, 1), 0)
            self.assertEqual(srv.stop(), 0, srv.log_text())
        finally:
            srv.cleanup()


if __name__ == "__main__":
    tl.main()
