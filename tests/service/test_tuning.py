#!/usr/bin/env python3
"""attnd end to end, tuning (issue 6): Python gRPC clients against real `attnd serve` processes
with --tuning-dir.

    ATTND_BIN=build/service/attnd ATTND_PY=build/py python3 tests/service/test_tuning.py

Every Attend output is checked against the float64 NumPy reference while tuning runs. No
assertion depends on timing (waits are bounded polls). The last line is `N passed, M failed`."""
import os
import shutil
import sys
import tempfile
import time
import unittest

sys.dont_write_bytecode = True  # no __pycache__ in the source tree
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import attnd_testlib as tl  # noqa: E402  (re-execs under the system python3 when needed)
from attnd_testlib import np, pb  # noqa: E402

SEED = int(os.environ.get("ATTND_TEST_SEED", str(int(time.time() * 1000) % (1 << 31))))
print("seed %d (rerun with ATTND_TEST_SEED=%d)" % (SEED, SEED), flush=True)
WAIT_S = 120


def wait_tuned(sess, seq, rng):
    """Probes seq (each probe checked against the reference) until the session's tuning jobs
    are done; returns the last SessionInfo."""
    until = time.monotonic() + WAIT_S
    while True:
        info = sess.get()
        if info.tuning_jobs_pending == 0:
            return info
        if time.monotonic() > until:
            raise AssertionError("tuning not done after %d s: %s" % (WAIT_S, info))
        time.sleep(0.05)
        sess.probe(seq, rng=rng)


class TTuning(unittest.TestCase):
    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix="attnd-tuning-")

    def tearDown(self):
        shutil.rmtree(self.dir, ignore_errors=True)

    def stores(self):
        return sorted(f for f in os.listdir(self.dir) if f.endswith(".json"))

    def test_two_models_tune_separately_and_a_restart_restores(self):
        """Two models in one server: each bucket is tuned once per model shape, on copies (every
        output stays exact), into one file per shape; a frozen restart restores both."""
        rng = np.random.default_rng([SEED, 1])
        srv = tl.AttndServer(extra_args=["--tuning-dir", self.dir]).start()
        chosen = {}
        try:
            stub = srv.stub()
            models = {"a": tl.Model(hq=8, hkv=2, d=64, dtype="bf16"),
                      "b": tl.Model(hq=4, hkv=4, d=32, dtype="f16")}
            for name, model in models.items():
                sess = tl.Session(stub, name, model).create()
                sess.attend([(1, 0, 48)], rng=rng)
                info = sess.get()
                self.assertEqual(info.tuning_source, pb.TUNING_SOURCE_HEURISTIC)
                info = wait_tuned(sess, 1, rng)
                self.assertGreater(info.tuning_runs, 0)
                sess.attend([(2, 0, 48)], rng=rng)  # same bucket: the tuned config
                info = sess.get()
                self.assertEqual(info.tuning_source, pb.TUNING_SOURCE_TUNED)
                chosen[name] = info.tuning_config
            self.assertEqual(len(self.stores()), 2)
        finally:
            self.assertEqual(srv.stop(), 0)
            srv.cleanup()
        srv = tl.AttndServer(extra_args=["--tuning-dir", self.dir, "--tuning", "frozen"]).start()
        try:
            stub = srv.stub()
            for name, model in (("a", tl.Model(hq=8, hkv=2, d=64, dtype="bf16")),
                                ("b", tl.Model(hq=4, hkv=4, d=32, dtype="f16"))):
                sess = tl.Session(stub, name + "2", model).create()
                sess.attend([(1, 0, 48)], rng=rng)
                info = sess.get()
                self.assertEqual(info.tuning_source, pb.TUNING_SOURCE_STORED)
                self.assertEqual(info.tuning_config, chosen[name])
                self.assertEqual(info.tuning_runs, 0)
        finally:
            self.assertEqual(srv.stop(), 0)
            srv.cleanup()

    def test_damaged_store_is_set_aside_and_serving_goes_on(self):
        """A store file that is not JSON is set aside (renamed .bad) when a session of its shape
        is created; the session serves on the heuristic."""
        rng = np.random.default_rng([SEED, 2])
        model = tl.Model(hq=8, hkv=2, d=64, dtype="bf16")
        srv = tl.AttndServer(extra_args=["--tuning-dir", self.dir]).start()
        try:
            sess = tl.Session(srv.stub(), "s", model).create()
            sess.attend([(1, 0, 16)], rng=rng)
            wait_tuned(sess, 1, rng)
        finally:
            self.assertEqual(srv.stop(), 0)
            srv.cleanup()
        [name] = self.stores()
        with open(os.path.join(self.dir, name), "w") as f:
            f.write("{not json")
        srv = tl.AttndServer(extra_args=["--tuning-dir", self.dir, "--tuning", "frozen"]).start()
        try:
            sess = tl.Session(srv.stub(), "s", model).create()
            sess.attend([(1, 0, 16)], rng=rng)
            self.assertEqual(sess.get().tuning_source, pb.TUNING_SOURCE_HEURISTIC)
            self.assertTrue(os.path.exists(os.path.join(self.dir, name + ".bad")))
        finally:
            self.assertEqual(srv.stop(), 0)
            srv.cleanup()

    def test_bad_tuning_mode_is_refused(self):
        srv = tl.AttndServer(extra_args=["--tuning", "sometimes"])
        try:
            self.assertEqual(srv.start_expecting_failure(), 2)
        finally:
            srv.cleanup()


if __name__ == "__main__":
    result = unittest.main(exit=False, verbosity=2).result
    failed = len(result.failures) + len(result.errors)
    print("%d passed, %d failed" % (result.testsRun - failed, failed))
    sys.exit(1 if failed else 0)
