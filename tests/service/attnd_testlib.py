"""Shared helpers for attnd's end-to-end tests (tests/service/test_interop*.py, test_e2e*.py).

- where things are: the attnd binary and the generated Python stubs, from argv
  (--attnd-bin PATH, --attnd-py DIR) or the environment (ATTND_BIN, ATTND_PY);
- AttndServer: a real `attnd serve` subprocess on 127.0.0.1 (port 0), its ready file, channels,
  and a SIGTERM stop that must end with exit status 0;
- dtype codecs: numpy arrays to and from little-endian f32 / f16 / bf16 bytes (bf16 by
  round-to-nearest-even from the f32 bits, as the server's clients are expected to do);
- Reference: a float64 NumPy model of the attention op with its own K/V history per
  (sequence, layer) and the op's exact semantics (tests/attention/att_oracle.h): rollback to
  start_pos, causal masking, sliding window i - j < W, soft cap c * tanh(s / c), ALiBi
  slope * (j - i), sinks in the denominator only, GQA head h reading KV head h // (Hq / Hkv);
  plus the KV figures the server reports (whole blocks per sequence).

Every wait here is bounded."""
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

# ---- interpreter and paths ---------------------------------------------------------------------


def _pop_arg(argv, name):
    """Removes `name VALUE` or `name=VALUE` from argv and returns VALUE (or None)."""
    for i, a in enumerate(argv):
        if a == name and i + 1 < len(argv):
            val = argv[i + 1]
            del argv[i:i + 2]
            return val
        if a.startswith(name + "="):
            del argv[i]
            return a[len(name) + 1:]
    return None


def _ensure_grpc_python():
    """The tests need the Debian python3-grpcio, python3-numpy and python3-protobuf. When the
    `python3` on PATH is another interpreter (pyenv, a venv) that lacks them, re-run this script
    with the system interpreter, once."""
    try:
        import grpc  # noqa: F401
        import numpy  # noqa: F401
        import google.protobuf  # noqa: F401
        return
    except ImportError as e:
        missing = e
    syspy = "/usr/bin/python3"
    if (os.environ.get("ATTND_TEST_REEXEC") != "1" and os.path.exists(syspy)
            and os.path.realpath(sys.executable) != os.path.realpath(syspy)):
        env = dict(os.environ, ATTND_TEST_REEXEC="1")
        os.execve(syspy, [syspy] + sys.argv, env)
    sys.stderr.write("attnd_testlib: %s (install python3-grpcio python3-numpy "
                     "python3-protobuf)\n" % missing)
    sys.exit(2)


_ensure_grpc_python()

import grpc  # noqa: E402
import numpy as np  # noqa: E402

ATTND_BIN = _pop_arg(sys.argv, "--attnd-bin") or os.environ.get("ATTND_BIN", "")
ATTND_PY = _pop_arg(sys.argv, "--attnd-py") or os.environ.get("ATTND_PY", "")
if not ATTND_BIN or not os.access(ATTND_BIN, os.X_OK):
    sys.stderr.write("attnd_testlib: set ATTND_BIN (or --attnd-bin) to the attnd binary; "
                     "got %r\n" % ATTND_BIN)
    sys.exit(2)
if not ATTND_PY or not os.path.isdir(os.path.join(ATTND_PY, "attnd", "v1")):
    sys.stderr.write("attnd_testlib: set ATTND_PY (or --attnd-py) to the build's py/ stubs "
                     "directory; got %r\n" % ATTND_PY)
    sys.exit(2)
sys.path.insert(0, ATTND_PY)

from attnd.v1 import attention_pb2 as pb  # noqa: E402
from attnd.v1 import attention_pb2_grpc as pb_grpc  # noqa: E402
from grpc_health.v1 import health_pb2 as health_pb  # noqa: E402
from grpc_health.v1 import health_pb2_grpc as health_grpc  # noqa: E402

# Sanitizer builds are several times slower; every per-call timeout below is generous and only
# bounds a hang, it asserts nothing about speed.
RPC_TIMEOUT_S = float(os.environ.get("ATTND_TEST_RPC_TIMEOUT", "120"))
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 90.0

CHANNEL_OPTIONS = [
    ("grpc.enable_http_proxy", 0),  # loopback only, whatever the environment says
    ("grpc.max_receive_message_length", 256 << 20),
    ("grpc.max_send_message_length", 256 << 20),
]

# ---- the server --------------------------------------------------------------------------------


class AttndServer:
    """One `attnd serve` subprocess. start() waits (bounded) for its ready file; stop() sends
    SIGTERM and returns the exit status (killing it, and raising, if it does not exit in time)."""

    def __init__(self, extra_args=(), cpu_threads=2, log_level="warn"):
        self.extra_args = list(extra_args)
        self.cpu_threads = cpu_threads
        self.log_level = log_level
        self.dir = tempfile.mkdtemp(prefix="attnd-e2e-")
        self.ready_file = os.path.join(self.dir, "ready")
        self.log_path = os.path.join(self.dir, "server.log")
        self.proc = None
        self.address = None
        self._log = None
        self._channels = []

    def start(self, timeout=START_TIMEOUT_S):
        cmd = [ATTND_BIN, "serve", "--listen", "127.0.0.1:0", "--ready-file", self.ready_file,
               "--cpu-threads", str(self.cpu_threads), "--log-level", self.log_level]
        cmd += self.extra_args
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=self._log,
                                     stderr=subprocess.STDOUT)
        until = time.monotonic() + timeout
        while True:
            if os.path.exists(self.ready_file):
                with open(self.ready_file) as f:
                    line = f.read().strip()
                if line:
                    break
            if self.proc.poll() is not None:
                raise RuntimeError("attnd serve exited with %d before it was ready:\n%s"
                                   % (self.proc.returncode, self.log_text()))
            if time.monotonic() > until:
                self.kill()
                raise RuntimeError("attnd serve not ready after %.0f s:\n%s"
                                   % (timeout, self.log_text()))
            time.sleep(0.05)
        host, _, port = line.rpartition(":")
        if host != "127.0.0.1" or not port.isdigit() or int(port) == 0:
            raise RuntimeError("ready file holds %r, expected 127.0.0.1:PORT" % line)
        self.address = line
        return self

    def start_expecting_failure(self, timeout=START_TIMEOUT_S):
        """Starts a server that must refuse to run; returns its exit status (bounded wait)."""
        cmd = [ATTND_BIN, "serve", "--listen", "127.0.0.1:0", "--ready-file", self.ready_file,
               "--cpu-threads", str(self.cpu_threads), "--log-level", self.log_level]
        cmd += self.extra_args
        try:
            done = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True,
                                  timeout=timeout)
        except subprocess.TimeoutExpired:
            raise RuntimeError("attnd serve %s ran instead of refusing" % self.extra_args)
        if os.path.exists(self.ready_file):
            raise RuntimeError("attnd serve %s became ready" % self.extra_args)
        return done.returncode

    def channel(self, timeout=START_TIMEOUT_S):
        ch = grpc.insecure_channel(self.address, options=CHANNEL_OPTIONS)
        grpc.channel_ready_future(ch).result(timeout=timeout)
        self._channels.append(ch)
        return ch

    def stub(self, channel=None):
        return pb_grpc.AttentionStub(channel or self.channel())

    def log_text(self, limit=8000):
        try:
            if self._log is not None:
                self._log.flush()
            with open(self.log_path, "rb") as f:
                data = f.read()
        except OSError:
            return "(no log)"
        text = data.decode("utf-8", "replace")
        return text[-limit:]

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def signal_term(self):
        self.proc.send_signal(signal.SIGTERM)

    def wait(self, timeout=STOP_TIMEOUT_S):
        """Exit status, or None when the process is still running after timeout."""
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self, timeout=STOP_TIMEOUT_S):
        """Closes this object's channels (as a client that is done would), sends SIGTERM and
        returns the exit status. Raises (after SIGKILL) when it does not exit in time. (With
        idle connections left open, the drain waits for them, up to --grace-ms.)"""
        if self.proc is None:
            return None
        self._close_channels()
        if self.proc.poll() is None:
            self.signal_term()
        rc = self.wait(timeout)
        self._close()
        if rc is None:
            self.kill()
            raise AssertionError("attnd serve did not exit within %.0f s of SIGTERM:\n%s"
                                 % (timeout, self.log_text()))
        return rc

    def kill(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
        self._close()

    def _close_channels(self):
        for ch in self._channels:
            try:
                ch.close()
            except Exception:  # noqa: BLE001 - best effort on teardown
                pass
        self._channels = []

    def _close(self):
        self._close_channels()
        if self._log is not None:
            self._log.close()
            self._log = None

    def cleanup(self):
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


def health_stub(channel):
    return health_grpc.HealthStub(channel)


# ---- dtypes ------------------------------------------------------------------------------------

DTYPES = {"f32": pb.F32, "f16": pb.F16, "bf16": pb.BF16}
DTYPE_BYTES = {"f32": 4, "f16": 2, "bf16": 2}
# abs + rel tolerance of an output element against the float64 reference
TOLERANCE = {"f32": 1e-4, "f16": 3e-3, "bf16": 2e-2}


def f32_to_bf16_bits(a):
    """uint16 bf16 bit patterns of a (converted to float32 first), round to nearest even."""
    u = np.ascontiguousarray(np.asarray(a, dtype=np.float32)).view(np.uint32)
    rounded = ((u + (np.uint32(0x7FFF) + ((u >> 16) & np.uint32(1)))) >> 16).astype(np.uint16)
    nan = np.isnan(np.asarray(a, dtype=np.float32))
    if nan.any():
        quiet = ((u >> 16) | np.uint32(0x0040)).astype(np.uint16)
        rounded = np.where(nan, quiet, rounded)
    return rounded


def bf16_bits_to_f32(bits):
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def to_bytes(a, dtype):
    """Little-endian bytes of array a in dtype ('f32', 'f16' or 'bf16'), row-major."""
    a = np.asarray(a)
    if dtype == "f32":
        return np.ascontiguousarray(a, dtype="<f4").tobytes()
    if dtype == "f16":
        return np.ascontiguousarray(a.astype(np.float32).astype("<f2")).tobytes()
    if dtype == "bf16":
        return np.ascontiguousarray(f32_to_bf16_bits(a)).astype("<u2").tobytes()
    raise ValueError(dtype)


def from_bytes(b, dtype, shape=None):
    """float64 array of little-endian dtype bytes (exact: every f32/f16/bf16 value is a double)."""
    if dtype == "f32":
        a = np.frombuffer(b, dtype="<f4").astype(np.float64)
    elif dtype == "f16":
        a = np.frombuffer(b, dtype="<f2").astype(np.float64)
    elif dtype == "bf16":
        a = bf16_bits_to_f32(np.frombuffer(b, dtype="<u2")).astype(np.float64)
    else:
        raise ValueError(dtype)
    return a.reshape(shape) if shape is not None else a


def quantize(a, dtype):
    """a rounded to dtype and back, as float64 (what the server will see)."""
    return from_bytes(to_bytes(a, dtype), dtype, np.shape(a))


# ---- models ------------------------------------------------------------------------------------


class Model:
    """A ModelConfig in Python terms: dtype is 'f32', 'f16' or 'bf16'."""

    def __init__(self, num_layers=1, hq=4, hkv=1, d=64, dtype="f32", block_size=0, scale=0.0,
                 window=0, layer_windows=(), soft_cap=0.0, alibi=(), sinks=(), name="m"):
        self.num_layers = num_layers
        self.hq = hq
        self.hkv = hkv
        self.d = d
        self.dtype = dtype
        self.block_size = block_size
        self.scale = scale
        self.window = window
        self.layer_windows = list(layer_windows)
        self.soft_cap = soft_cap
        self.alibi = list(alibi)
        self.sinks = list(sinks)
        self.name = name

    def proto(self):
        return pb.ModelConfig(
            name=self.name, num_layers=self.num_layers, num_query_heads=self.hq,
            num_kv_heads=self.hkv, head_dim=self.d, dtype=DTYPES[self.dtype],
            block_size=self.block_size, scale=self.scale, sliding_window=self.window,
            layer_sliding_window=self.layer_windows, logits_soft_cap=self.soft_cap,
            alibi_slopes=self.alibi, sinks=self.sinks)

    @property
    def resolved_block_size(self):
        return self.block_size or 16

    @property
    def esize(self):
        return DTYPE_BYTES[self.dtype]

    def __repr__(self):
        return ("Model(L=%d Hq=%d Hkv=%d D=%d %s bs=%d win=%s/%s cap=%g alibi=%d sinks=%d)"
                % (self.num_layers, self.hq, self.hkv, self.d, self.dtype, self.block_size,
                   self.window, self.layer_windows, self.soft_cap, len(self.alibi),
                   len(self.sinks)))


def f32(x):
    """x as the float32 the wire carries, widened to a Python float."""
    return float(np.float32(x))


class OutOfRange(Exception):
    pass


class Reference:
    """The attention op in float64 with its own K/V history per (sequence, layer) of one session.
    Inputs are float64 arrays holding exactly the values the server decodes."""

    def __init__(self, model):
        m = model
        self.m = m
        self.scale = f32(m.scale) if m.scale != 0 else 1.0 / math.sqrt(m.d)
        self.cap = f32(m.soft_cap)
        self.windows = (list(m.layer_windows) if m.layer_windows
                        else [m.window] * m.num_layers)
        self.alibi = np.array([f32(x) for x in m.alibi]) if m.alibi else None
        self.sinks = np.array([f32(x) for x in m.sinks]) if m.sinks else None
        self.seqs = {}  # seq_id -> [layer] -> (k [L, Hkv, D], v [L, Hkv, D])

    def _empty(self):
        z = np.zeros((0, self.m.hkv, self.m.d))
        return [(z, z) for _ in range(self.m.num_layers)]

    def seq_len(self, seq, layer):
        s = self.seqs.get(seq)
        return 0 if s is None else s[layer][0].shape[0]

    def kv_row(self, seq, layer, pos):
        """The cached (k, v) rows [Hkv, D] at pos."""
        k, v = self.seqs[seq][layer]
        return k[pos], v[pos]

    def run(self, layer, chunks, q, k, v):
        """chunks: [(seq_id, start_pos, n)]; q [T, Hq, D], k and v [T, Hkv, D] (float64).
        Returns out [T, Hq, D]. Raises OutOfRange, having changed nothing, like the server."""
        for seq, start, n in chunks:
            if start > self.seq_len(seq, layer):
                raise OutOfRange("seq %d: start_pos %d past length %d"
                                 % (seq, start, self.seq_len(seq, layer)))
        m = self.m
        out = np.zeros((q.shape[0], m.hq, m.d))
        t0 = 0
        for seq, start, n in chunks:
            layers = self.seqs.setdefault(seq, self._empty())
            kh, vh = layers[layer]
            kh = np.concatenate([kh[:start], k[t0:t0 + n]], axis=0)
            vh = np.concatenate([vh[:start], v[t0:t0 + n]], axis=0)
            layers[layer] = (kh, vh)
            out[t0:t0 + n] = self._attend(layer, kh, vh, q[t0:t0 + n], start)
            t0 += n
        return out

    def _attend(self, layer, kh, vh, q, start):
        m = self.m
        n = q.shape[0]
        length = kh.shape[0]
        group = m.hq // m.hkv
        kx = np.repeat(kh, group, axis=1)  # [L, Hq, D]: query head h reads KV head h // group
        vx = np.repeat(vh, group, axis=1)
        s = self.scale * np.einsum("thd,lhd->htl", q, kx)  # [Hq, n, L]
        if self.cap > 0:
            s = self.cap * np.tanh(s / self.cap)
        i = start + np.arange(n)[:, None]  # query positions [n, 1]
        j = np.arange(length)[None, :]     # key positions [1, L]
        if self.alibi is not None:
            s = s + self.alibi[:, None, None] * (j - i)[None, :, :]
        mask = j <= i
        w = self.windows[layer]
        if w:
            mask &= (i - j) < w
        s = np.where(mask[None], s, -np.inf)
        mx = s.max(axis=2, keepdims=True)
        if self.sinks is not None:
            mx = np.maximum(mx, self.sinks[:, None, None])
        p = np.exp(s - mx)
        den = p.sum(axis=2, keepdims=True)
        if self.sinks is not None:
            den = den + np.exp(self.sinks[:, None, None] - mx)
        o = np.einsum("htl,lhd->thd", p, vx) / np.transpose(den, (1, 0, 2))
        return o

    def release(self, ids):
        n = 0
        for s in set(ids):
            if self.seqs.pop(s, None) is not None:
                n += 1
        return n

    def num_sequences(self):
        return len(self.seqs)

    def kv_used_tokens(self):
        """Whole blocks: each sequence holds ceil(max over layers of its length / block)."""
        bs = self.m.resolved_block_size
        total = 0
        for layers in self.seqs.values():
            mx = max(k.shape[0] for k, _ in layers)
            total += -(-mx // bs) * bs
        return total


# ---- calls -------------------------------------------------------------------------------------


class Call:
    """One Attend call's tensors: wire bytes and the float64 values the server decodes."""

    def __init__(self, model, chunks, rng=None, q=None, k=None, v=None, q_amp=1.0):
        rng = rng if rng is not None else np.random.default_rng()
        m = model
        self.model = m
        self.chunks = [tuple(c) for c in chunks]
        t = sum(c[2] for c in self.chunks)
        self.tokens = t
        q = rng.standard_normal((t, m.hq, m.d)) * q_amp if q is None else q
        k = rng.standard_normal((t, m.hkv, m.d)) if k is None else k
        v = rng.standard_normal((t, m.hkv, m.d)) if v is None else v
        self.qb, self.kb, self.vb = (to_bytes(x, m.dtype) for x in (q, k, v))
        self.q = from_bytes(self.qb, m.dtype, (t, m.hq, m.d))
        self.k = from_bytes(self.kb, m.dtype, (t, m.hkv, m.d))
        self.v = from_bytes(self.vb, m.dtype, (t, m.hkv, m.d))

    def request(self, session, layer):
        return pb.AttendRequest(
            session=session, layer=layer,
            chunks=[pb.SequenceChunk(seq_id=s, start_pos=p, num_tokens=n)
                    for s, p, n in self.chunks],
            q=self.qb, k=self.kb, v=self.vb)


# ---- hand-made protobuf encodings (for wire-level interop tests) -------------------------------

WT_VARINT, WT_I64, WT_LEN, WT_GROUP_START, WT_GROUP_END, WT_I32 = 0, 1, 2, 3, 4, 5


def pb_varint(v, min_len=1):
    """Varint of v; min_len > the minimal length pads with 0x80 continuation bytes (an overlong
    but valid encoding)."""
    out = bytearray()
    while True:
        b = v & 0x7F
        v >>= 7
        if v or len(out) + 1 < min_len:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def pb_tag(num, wt):
    return pb_varint((num << 3) | wt)


def pb_len(num, payload):
    return pb_tag(num, WT_LEN) + pb_varint(len(payload)) + payload


def pb_uint(num, v, min_len=1):
    return pb_tag(num, WT_VARINT) + pb_varint(v, min_len)


def pb_chunk(seq, start, n, order=(1, 2, 3), explicit_zero=False, extra=b""):
    """A SequenceChunk message body, fields in the given order."""
    vals = {1: seq, 2: start, 3: n}
    body = b"".join(pb_uint(f, vals[f]) for f in order if vals[f] or explicit_zero)
    return body + extra


def mismatch(got, want, dtype, tol=None):
    """None when |got - want| <= tol + tol * |want| everywhere, else a description."""
    tol = TOLERANCE[dtype] if tol is None else tol
    if got.shape != want.shape:
        return "shape %s, expected %s" % (got.shape, want.shape)
    if not np.all(np.isfinite(got)):
        return "non-finite output at %s" % (np.argwhere(~np.isfinite(got))[:4].tolist(),)
    err = np.abs(got - want)
    bound = tol + tol * np.abs(want)
    bad = err > bound
    if not bad.any():
        return None
    idx = tuple(np.argwhere(bad)[0])
    return ("%d of %d elements off (tolerance %g abs+rel); first at %s: got %r, expected %r; "
            "max abs error %g" % (int(bad.sum()), bad.size, tol, idx, float(got[idx]),
                                  float(want[idx]), float(err.max())))


class Session:
    """A session on a server plus its reference: attend() runs a call on both and checks it."""

    def __init__(self, stub, name, model, capacity=4096):
        self.stub = stub
        self.name = name
        self.model = model
        self.capacity = capacity
        self.ref = Reference(model)
        self.info = None

    def create(self, timeout=RPC_TIMEOUT_S):
        self.info = self.stub.CreateSession(
            pb.CreateSessionRequest(session=self.name, model=self.model.proto(),
                                    kv_capacity_tokens=self.capacity), timeout=timeout)
        return self

    def raw_attend(self, call, layer=0, timeout=RPC_TIMEOUT_S):
        """The server's output as float64 [T, Hq, D] and the raw bytes; no reference update."""
        resp = self.stub.Attend(call.request(self.name, layer), timeout=timeout)
        m = self.model
        want = call.tokens * m.hq * m.d * m.esize
        if len(resp.out) != want:
            raise AssertionError("out has %d bytes, expected %d" % (len(resp.out), want))
        return from_bytes(resp.out, m.dtype, (call.tokens, m.hq, m.d)), resp.out

    def attend(self, chunks, layer=0, rng=None, call=None, q_amp=1.0, timeout=RPC_TIMEOUT_S):
        """Runs chunks at layer on the server and in the reference, asserts the outputs agree,
        returns (call, out bytes)."""
        call = call or Call(self.model, chunks, rng, q_amp=q_amp)
        got, raw = self.raw_attend(call, layer, timeout)
        want = self.ref.run(layer, call.chunks, call.q, call.k, call.v)
        err = mismatch(got, want, self.model.dtype)
        if err:
            raise AssertionError("session %s %r layer %d chunks %s: %s"
                                 % (self.name, self.model, layer, call.chunks, err))
        return call, raw

    def get(self, timeout=RPC_TIMEOUT_S):
        return self.stub.GetSession(pb.GetSessionRequest(session=self.name), timeout=timeout)

    def release(self, ids, timeout=RPC_TIMEOUT_S):
        r = self.stub.Release(pb.ReleaseRequest(session=self.name, seq_ids=list(ids)),
                              timeout=timeout)
        self.ref.release(ids)
        return r.released

    def close(self, timeout=RPC_TIMEOUT_S):
        return self.stub.CloseSession(pb.CloseSessionRequest(session=self.name), timeout=timeout)

    def figures_problem(self):
        """None when GetSession's kv_used_tokens and num_sequences match the reference."""
        info = self.get()
        want_used, want_n = self.ref.kv_used_tokens(), self.ref.num_sequences()
        if info.kv_used_tokens != want_used or info.num_sequences != want_n:
            return ("session %s: kv_used_tokens %d, num_sequences %d; expected %d, %d"
                    % (self.name, info.kv_used_tokens, info.num_sequences, want_used, want_n))
        return None

    def probe(self, seq, layer=0, rng=None):
        """Re-sends the last cached token of seq at layer (same k and v, fresh q): the cache is
        left exactly as it was, and the output checks attention over seq's whole history."""
        n = self.ref.seq_len(seq, layer)
        assert n >= 1, "probe of an empty sequence"
        k, v = self.ref.kv_row(seq, layer, n - 1)
        rng = rng if rng is not None else np.random.default_rng()
        call = Call(self.model, [(seq, n - 1, 1)], rng, k=k[None], v=v[None])
        return self.attend(None, layer, call=call)


def run_threads(targets, timeout):
    """Runs each callable in its own thread; returns the list of exceptions raised (plus one per
    thread still running after timeout)."""
    errors = []
    lock = threading.Lock()

    def wrap(fn):
        def body():
            try:
                fn()
            except BaseException as e:  # noqa: BLE001 - reported to the test
                import traceback
                with lock:
                    errors.append("%s: %s\n%s" % (type(e).__name__, e, traceback.format_exc()))
        return body

    threads = [threading.Thread(target=wrap(t), daemon=True) for t in targets]
    for t in threads:
        t.start()
    until = time.monotonic() + timeout
    for t in threads:
        t.join(max(0.0, until - time.monotonic()))
    stuck = sum(t.is_alive() for t in threads)
    if stuck:
        errors.append("%d thread(s) still running after %.0f s" % (stuck, timeout))
    return errors


# ---- running -----------------------------------------------------------------------------------


def main(module_name="__main__"):
    """Runs the unittest module (or the test names given as arguments, e.g. `T2Attend` or
    `T3Errors.test_cancelled`), prints `N passed, M failed` last (tests, a test with failing
    subtests counting once), and exits nonzero on any failure."""
    import unittest

    class Result(unittest.TextTestResult):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            self.passed = 0

        def addSuccess(self, test):
            super().addSuccess(test)
            self.passed += 1

    module = sys.modules[module_name]
    loader = unittest.defaultTestLoader
    names = [a for a in sys.argv[1:] if not a.startswith("-")]
    suite = (loader.loadTestsFromNames(names, module) if names
             else loader.loadTestsFromModule(module))
    runner = unittest.TextTestRunner(verbosity=2, resultclass=Result, stream=sys.stdout)
    res = runner.run(suite)
    failed_ids = set()
    for test, _ in res.failures + res.errors:
        parent = getattr(test, "test_case", test)  # a subtest counts as its test
        failed_ids.add(parent.id())
    failed = len(failed_ids) + len(res.unexpectedSuccesses)
    if not res.testsRun and not failed:
        failed = 1  # nothing ran at all
    sys.stdout.flush()
    print("%d passed, %d failed" % (res.passed, failed))
    sys.stdout.flush()
    sys.exit(0 if failed == 0 and res.wasSuccessful() else 1)
