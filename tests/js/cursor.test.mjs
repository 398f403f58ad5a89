// static/wsroom.js against the stream cursor cases (tests/cases/cursor.json), the same
// cases tests/unit/test_cursor.py runs against wsroom._core.cursor.StreamCursor and the Python
// client. Node's built-in runner: node --test tests/js/
//
// WsroomClient is driven through a fake WebSocket: each case's frames arrive as messages,
// and per msg the verdict must be the case's: new (onMessage called), duplicate (not
// called), hole or epoch (not called, and the client closes the socket with 3010 and
// goes "reconnecting", so that its next hello asks for what is missing).

import assert from "node:assert/strict";
import {readFileSync} from "node:fs";
import {test} from "node:test";

const root = new URL("../../", import.meta.url);
const doc = JSON.parse(readFileSync(new URL("tests/cases/cursor.json", root), "utf8"));
// Imported from its source as an ES module, whatever Node makes of a .js file.
const source = readFileSync(new URL("src/wsroom/static/wsroom.js", root), "utf8");
const {WsroomClient} = await import(
  "data:text/javascript;base64," + Buffer.from(source).toString("base64"));

class FakeWebSocket {
  static instances = [];

  constructor(url) {
    this.url = url;
    this.readyState = 0;
    this.sent = [];
    this.closedWith = null;
    this.onopen = this.onmessage = this.onclose = this.onerror = null;
    FakeWebSocket.instances.push(this);
  }

  send(text) {
    assert.equal(this.readyState, 1, "send on a socket that is not open");
    this.sent.push(JSON.parse(text));
  }

  close(code = 1000) {
    this.closedWith = code;
    this.readyState = 3;
  }

  // The server's side.
  open() {
    this.readyState = 1;
    this.onopen();
  }

  deliver(frame) {
    this.onmessage({data: JSON.stringify(frame)});
  }
}

globalThis.WebSocket = FakeWebSocket;
console.warn = () => {}; // the client says why it drops a socket

function wire(frame, index) {
  const {expect, ...rest} = frame;
  if (rest.type === "welcome") return {type: "welcome", ...doc.welcome, ...rest};
  if (rest.type === "msg") return {...rest, event: "m", data: index};
  return rest;
}

for (const kase of doc.cases) {
  test(kase.name, () => {
    FakeWebSocket.instances = [];
    const delivered = [];
    const client = new WsroomClient("ws://server/ws", {
      onMessage: ({data}) => delivered.push(data),
    });
    try {
      client.connect();
      const [ws] = FakeWebSocket.instances;
      ws.open();
      assert.equal(ws.sent[0].type, "hello");
      kase.frames.forEach((frame, index) => {
        assert.equal(ws.closedWith, null, `frame ${index} after the socket was dropped`);
        ws.deliver(wire(frame, index));
      });
      const frames = kase.frames;
      const expectedNew = frames.flatMap((frame, index) => frame.expect === "new" ? [index] : []);
      assert.deepEqual(delivered, expectedNew, "the messages delivered");
      const last = frames[frames.length - 1].expect;
      if (last === "hole" || last === "epoch") {
        assert.equal(ws.closedWith, 3010, "a gap drops the socket with 3010");
        assert.equal(client.state, "reconnecting");
      } else {
        assert.equal(ws.closedWith, null, "the socket stays");
        assert.equal(client.state, "connected");
      }
      const positions = Object.fromEntries(
        [...client.positions].map(([name, {epoch, offset}]) => [name, [epoch, offset]]));
      assert.deepEqual(positions, kase.positions, "the positions after the last frame");
    } finally {
      client.close();
    }
  });
}
