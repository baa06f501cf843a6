"""Issue 11's end-to-end burst: 50 devices with permessage-deflate (context
takeover both ways, as the SDK offers it), each sending bursts of 20
identical 2 KiB requests in flight plus a 48 KiB multipart request, for
30 s. Every request is answered with its echo, no device is closed,
edgemux stays alive. Runs in the e2e label, so the AddressSanitizer tier
(scripts/test.sh) runs it too."""

import random
import threading
import time
import unittest

from harness import PUT, SUCCESS, ao_infotable_blob, ao_multipart_request
from rfcdevice import Device, EdgeSuite, ao_post, echoed_blob

DEVICES = 50
DURATION = 30.0


def payload(rng, n):
    out = bytearray()
    while len(out) < n:
        k = rng.randrange(1, 400)
        kind = rng.randrange(3)
        out += rng.randbytes(k) if kind == 0 else bytes(k) if kind == 1 else b"Temperature=42.5;" * (k // 17 + 1)
    return bytes(out[:n])


class DeflateBurst(EdgeSuite):
    INSTANCES = 2

    def test_50_devices_bursts_and_multipart_for_30s(self):
        self.start_canary()
        devs = []
        for i in range(DEVICES):
            d = Device(self.port, deflate=True, app_key=self.env.app_key, timeout=30.0)
            code, _ = d.auth(self.env.app_key)
            self.assertEqual(code, SUCCESS)
            devs.append(d)
        stats = {"bursts": 0, "requests": 0, "multipart": 0}
        failures = []
        lock = threading.Lock()
        end = time.monotonic() + DURATION

        def run(i, d):
            rng = random.Random(1000 + i)
            smalls = [payload(rng, 2048 - 60) for _ in range(4)]
            bigs = [payload(rng, 48 * 1024) for _ in range(2)]
            n = 0
            try:
                while time.monotonic() < end:
                    data = smalls[n % len(smalls)]
                    big = bigs[n % len(bigs)]
                    n += 1
                    rids = [d.rid() for _ in range(20)]
                    wire = b"".join(b"".join(d.message_frames(ao_post(r, d.session, data))) for r in rids)
                    mrid = d.rid()
                    for c in ao_multipart_request(PUT, mrid, d.session, 1, chunk_size=8192, fill=big):
                        wire += b"".join(d.message_frames(c))
                    if not d.send_raw(wire):
                        raise AssertionError("the server closed the device during a burst")
                    for r in rids:
                        code, chunks = d.answer(r, timeout=30.0)
                        if code != SUCCESS or echoed_blob(chunks) != ao_infotable_blob("data", data):
                            raise AssertionError("request %d answered 0x%02x or with a wrong echo" % (r, code))
                    code, chunks = d.answer(mrid, timeout=30.0)
                    if code != SUCCESS or echoed_blob(chunks) != ao_infotable_blob("data", big):
                        raise AssertionError("multipart %d answered 0x%02x or with a wrong echo" % (mrid, code))
                    with lock:
                        stats["bursts"] += 1
                        stats["requests"] += 21
                        stats["multipart"] += 1
            except Exception as e:  # noqa: BLE001 - reported below
                with lock:
                    failures.append("device %d: %r (close code %r)" % (i, e, d.close_code))

        threads = [threading.Thread(target=run, args=(i, d), daemon=True) for i, d in enumerate(devs)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(DURATION + 90)
        hung = sum(1 for t in threads if t.is_alive())
        print("\n%d devices, %.0f s: %r; failures %d, threads still running %d"
              % (DEVICES, DURATION, stats, len(failures), hung))
        self.assertEqual(hung, 0, "device threads did not finish")
        self.assertEqual(failures, [], "\n".join(failures[:10]))
        self.assertTrue(self.emx.proc.alive(), "edgemux died")
        self.assertGreaterEqual(stats["bursts"], DEVICES, stats)
        # no device was closed: each still gets answers
        for i, d in enumerate(devs):
            self.assertEqual(d.get(timeout=10.0), SUCCESS, "device %d after the run" % i)
            d.close()
        self.assertEqual(self.plat.stats()["violations"], 0)
        self.check_canary()


if __name__ == "__main__":
    unittest.main()
