#!/usr/bin/env python3
"""attnd end to end, worker processes: a CPU device whose workers run as processes
(--worker-mode process, as every GPU's do by default), killed with SIGKILL mid-traffic and made to
abort by the test-only fault switch (ATTND_TEST_FAULT=cpu:N). Python gRPC clients against real
`attnd serve` processes.

    ATTND_BIN=build/service/attnd ATTND_PY=build/py python3 tests/service/test_workers.py

What must hold: calls in flight on the dead worker fail UNAVAILABLE; its sessions answer
FAILED_PRECONDITION "session lost" afterwards (GetSession says lost) until closed, after which the
name is free again; sessions on the other worker and on another device keep their KV (outputs
checked against the float64 reference); the worker comes back and new sessions compute right;
health reports the device NOT_SERVING while its only worker is down and SERVING again after.
No assertion depends on timing: waits are bounded loops on observable state."""
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

SERVING = tl.health_pb.HealthCheckResponse.SERVING
NOT_SERVING = tl.health_pb.HealthCheckResponse.NOT_SERVING
WAIT_S = 60.0


def code_of(fn, *a, **kw):
    """The status code of fn(*a, **kw): OK when it returns."""
    try:
        fn(*a, **kw)
        return grpc.StatusCode.OK, ""
    except grpc.RpcError as e:
        return e.code(), e.details() or ""


def worker_pids(server_pid, device):
    """{worker index: pid} of the server's worker processes of device, from /proc."""
    pids = {}
    for tid in os.listdir("/proc/%d/task" % server_pid):
        try:
            with open("/proc/%d/task/%s/children" % (server_pid, tid)) as f:
                children = f.read().split()
        except OSError:
            continue
        for child in children:
            try:
                with open("/proc/%s/cmdline" % child, "rb") as f:
                    argv = f.read().decode().split("\0")
            except OSError:
                continue
            if "worker" in argv and argv[argv.index("--device") + 1] == device:
                endpoint = argv[argv.index("--endpoint") + 1]
                index = int(endpoint.rsplit("/w", 1)[1].split(".")[0])
                pids[index] = int(child)
    return pids


def wait_for(what, predicate, timeout=WAIT_S):
    until = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > until:
            raise AssertionError("gave up waiting for " + what)
        time.sleep(0.02)


def health(ch, service):
    h = tl.health_stub(ch)
    return h.Check(tl.health_pb.HealthCheckRequest(service=service),
                   timeout=tl.RPC_TIMEOUT_S).status


def prefill(sess, seq, n, rng):
    sess.attend([(seq, 0, n)], rng=rng)


class Base(unittest.TestCase):
    def assert_lost(self, sess):
        code, details = code_of(sess.attend, [(0, sess.ref.seq_len(0, 0), 1)],
                                rng=np.random.default_rng(1))
        self.assertEqual(code, grpc.StatusCode.FAILED_PRECONDITION, details)
        self.assertIn("session lost", details)
        self.assertTrue(sess.get().lost)

    def recreate(self, sess, rng):
        """Close the lost session (frees its name and quota), create it again, use it."""
        sess.close()
        self.assertEqual(code_of(sess.get)[0], grpc.StatusCode.NOT_FOUND)
        fresh = tl.Session(sess.stub, sess.name, sess.model).create()
        self.assertFalse(fresh.info.lost)
        self.assertEqual(fresh.info.kv_used_tokens, 0)
        prefill(fresh, 0, 24, rng)
        fresh.attend([(0, 24, 1)], rng=rng)
        return fresh


class TKill(Base):
    """Two CPU worker processes; SIGKILL one of them while a client keeps calling."""

    def test_kill_9_mid_traffic(self):
        rng = np.random.default_rng([SEED, 1])
        srv = tl.AttndServer(extra_args=["--devices", "cpu", "--worker-mode", "process",
                                         "--workers-per-device", "2", "--null-device",
                                         "--batch-tokens", "0"], cpu_threads=2).start()
        try:
            stub = srv.stub()
            m = tl.Model(num_layers=1, hq=4, hkv=2, d=32, dtype="f32", block_size=16)
            victim = tl.Session(stub, "victim", m).create()   # worker 0 (fewest sessions)
            other = tl.Session(stub, "other", m).create()     # worker 1
            prefill(victim, 0, 40, rng)
            prefill(other, 0, 40, rng)
            pids = worker_pids(srv.proc.pid, "cpu")
            self.assertEqual(sorted(pids), [0, 1], "worker processes of cpu: %s" % pids)

            calls = []
            started = threading.Event()

            def traffic():
                t_rng = np.random.default_rng([SEED, 2])
                while True:
                    pos = victim.ref.seq_len(0, 0)
                    code, details = code_of(victim.attend, [(0, pos, 1)], rng=t_rng)
                    calls.append((code, details))
                    started.set()
                    if code != grpc.StatusCode.OK or len(calls) > 100000:
                        return

            t = threading.Thread(target=traffic, daemon=True)
            t.start()
            self.assertTrue(started.wait(WAIT_S))
            os.kill(pids[0], signal.SIGKILL)
            t.join(WAIT_S)
            self.assertFalse(t.is_alive())
            code, details = calls[-1]
            # in flight when it died: UNAVAILABLE; sent after the death was seen: lost
            self.assertIn(code, (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.FAILED_PRECONDITION),
                          details)
            self.assert_lost(victim)
            # the other worker's session kept its KV: every probe reads its whole history
            self.assertFalse(other.get().lost)
            other.probe(0, rng=rng)
            other.attend([(0, 40, 1)], rng=rng)
            # the other device is untouched
            stub.CreateSession(pb.CreateSessionRequest(session="n", model=m.proto(),
                                                       kv_capacity_tokens=64, device="null"),
                               timeout=tl.RPC_TIMEOUT_S)
            ch = srv.channel()
            self.assertEqual(health(ch, ""), SERVING)
            self.assertEqual(health(ch, "attnd.device.null"), SERVING)
            wait_for("a new cpu worker 0",
                     lambda: worker_pids(srv.proc.pid, "cpu").get(0, pids[0]) != pids[0])
            wait_for("cpu serving", lambda: health(ch, "attnd.device.cpu") == SERVING)
            self.recreate(victim, rng)
            other.probe(0, rng=rng)
            self.assertEqual(srv.stop(), 0)
        finally:
            srv.cleanup()


class TFaultSwitch(Base):
    """One CPU worker process that aborts on its third Attend (ATTND_TEST_FAULT=cpu:3)."""

    def test_abort_switch(self):
        rng = np.random.default_rng([SEED, 3])
        os.environ["ATTND_TEST_FAULT"] = "cpu:3"
        try:
            srv = tl.AttndServer(extra_args=["--devices", "cpu", "--worker-mode", "process",
                                             "--null-device", "--worker-restart-ms", "300"],
                                 cpu_threads=1).start()
        finally:
            del os.environ["ATTND_TEST_FAULT"]
        try:
            stub = srv.stub()
            ch = srv.channel()
            seen = []
            watch = tl.health_stub(ch).Watch(
                tl.health_pb.HealthCheckRequest(service="attnd.device.cpu"),
                timeout=tl.RPC_TIMEOUT_S)

            def watcher():
                for r in watch:
                    seen.append(r.status)
                    if seen[-2:] == [NOT_SERVING, SERVING]:
                        return

            wt = threading.Thread(target=watcher, daemon=True)
            wt.start()
            # listed as a watcher before its first message: every change from here on is sent
            wait_for("the first Watch message", lambda: len(seen) > 0)
            m = tl.Model(num_layers=2, hq=4, hkv=1, d=64, dtype="bf16", block_size=16)
            sess = tl.Session(stub, "s", m).create()
            null = stub.CreateSession(pb.CreateSessionRequest(
                session="n", model=m.proto(), kv_capacity_tokens=64, device="null"),
                timeout=tl.RPC_TIMEOUT_S)
            self.assertFalse(null.lost)
            prefill(sess, 0, 30, rng)                      # request 1
            sess.attend([(0, 30, 1)], rng=rng)             # request 2
            code, details = code_of(sess.attend, [(0, 31, 1)], rng=rng)  # 3: the worker aborts
            self.assertEqual(code, grpc.StatusCode.UNAVAILABLE, details)
            self.assertIn("worker", details)
            self.assert_lost(sess)
            self.assertEqual(health(ch, ""), SERVING)      # the null device still serves
            null_call = tl.Call(m, [(0, 0, 2)], rng)
            stub.Attend(null_call.request("n", 0), timeout=tl.RPC_TIMEOUT_S)
            wt.join(WAIT_S)
            self.assertFalse(wt.is_alive(), "watch saw %s" % seen)
            self.assertEqual(seen[0], SERVING)
            self.assertEqual(seen[-2:], [NOT_SERVING, SERVING])
            watch.cancel()
            self.assertEqual(health(ch, "attnd.device.cpu"), SERVING)
            fresh = self.recreate(sess, rng)               # the new worker has no switch
            fresh.attend([(0, 0, 8)], layer=1, rng=rng)
            fresh.attend([(0, 8, 1)], layer=1, rng=rng)
            self.assertIsNone(fresh.figures_problem())
            self.assertEqual(srv.stop(), 0)
        finally:
            srv.cleanup()

    def test_unknown_health_service(self):
        srv = tl.AttndServer(extra_args=["--devices", "cpu"]).start()
        try:
            ch = srv.channel()
            self.assertEqual(health(ch, "attnd.device.cpu"), SERVING)
            code, _ = code_of(health, ch, "attnd.device.cuda:7")
            self.assertEqual(code, grpc.StatusCode.NOT_FOUND)
            self.assertEqual(srv.stop(), 0)
        finally:
            srv.cleanup()


if __name__ == "__main__":
    tl.main()
