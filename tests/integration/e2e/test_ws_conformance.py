"""A WebSocket conformance subset against the edge listener (the Autobahn
suite is not packaged here): fragmentation, control frames between
fragments, the close handshake and its codes, reserved bits and opcodes,
masking rules. Raw frames from a plain socket."""

import struct
import unittest

from harness import GET, SUCCESS, E2ETest, Edgemux, Platform, ao_parse, ao_request


class Conformance(E2ETest):
    def setUp(self):
        super().setUp()
        self.plat = Platform(self.env, 1)
        self.emx = Edgemux(self.env, "emx-ws", self.plat.ports)
        self.emx.wait_ready()

    def authed(self):
        e = self.emx.edge(app_key=self.env.app_key)
        code, sid = e.auth(self.env.app_key)
        self.assertEqual(code, SUCCESS)
        return e, sid

    def test_fragmented_message_with_control_frames_between(self):
        e, sid = self.authed()
        msg = ao_request(GET, 2, sid)
        e.send_frame(0x2, msg[:5], fin=False)
        e.send_frame(0x9, b"06:44:02")           # ping between fragments
        e.send_frame(0x0, msg[5:11], fin=False)
        e.send_frame(0xA, b"unsolicited")        # pong between fragments
        e.send_frame(0x0, msg[11:], fin=True)
        pongs, answer = [], None
        e.sock.settimeout(5)
        while answer is None or not pongs:  # the pong may come before or after
            opcode, fin, payload = e.recv_frame()
            if opcode == 0xA:
                pongs.append(payload)
            else:
                self.assertEqual(opcode, 0x2)
                answer = payload
        self.assertEqual(ao_parse(answer)[:2], (SUCCESS, 2))
        self.assertIn(b"06:44:02", pongs)  # a ping is answered with its payload

    def test_close_handshake_echoes_code(self):
        e, sid = self.authed()
        e.send_frame(0x8, struct.pack(">H", 1000) + b"bye")
        opcode, fin, payload = e.recv_frame()
        self.assertEqual(opcode, 0x8)
        self.assertEqual(struct.unpack(">H", payload[:2])[0], 1000)

    def expect_protocol_error(self, send):
        e, sid = self.authed()
        send(e)
        self.assertEqual(e.expect_close(), 1002)

    def test_reserved_bits_1002(self):
        self.expect_protocol_error(lambda e: e.send_frame(0x2, b"x" * 15, rsv=2))

    def test_reserved_opcode_1002(self):
        self.expect_protocol_error(lambda e: e.send_frame(0x3, b"x"))

    def test_continuation_without_start_1002(self):
        self.expect_protocol_error(lambda e: e.send_frame(0x0, b"x" * 15, fin=True))

    def test_new_message_inside_fragmented_one_1002(self):
        def send(e):
            e.send_frame(0x2, b"x" * 5, fin=False)
            e.send_frame(0x2, b"y" * 5, fin=True)
        self.expect_protocol_error(send)

    def test_fragmented_control_frame_1002(self):
        self.expect_protocol_error(lambda e: e.send_frame(0x9, b"p", fin=False))

    def test_oversized_control_frame_1002(self):
        # RFC 6455 §5.5: control payloads are at most 125 bytes; the close
        # frame reaches the device before the socket closes.
        e, sid = self.authed()
        e.send_frame(0x9, b"p" * 126)
        self.assertEqual(e.expect_close(), 1002)

    # RFC 6455 §5.1: a server MUST close on an unmasked client frame.
    def test_unmasked_client_frame_1002(self):
        self.expect_protocol_error(lambda e: e.send_frame(0x2, b"x" * 15, mask=False))

    def test_zero_key_mask_accepted(self):
        e, sid = self.authed()  # every frame of RawEdge uses the all-zero key
        e.send(ao_request(GET, 2, sid))
        self.assertEqual(ao_parse(e.recv())[:2], (SUCCESS, 2))


if __name__ == "__main__":
    unittest.main()
