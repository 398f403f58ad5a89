// wsroom browser client: a dependency-free ES module speaking the wsroom wire contract v1.
//
// Serve it with `Mount("/wsroom", app=wsroom.static_files())`, then:
//
//   import {WsroomClient} from "/wsroom/wsroom.js";
//   const client = new WsroomClient("wss://example.com/ws", {
//     storage: window.sessionStorage,            // a reload resumes the session
//     onMessage: ({stream, event, data}) => render(stream, event, data),
//     onSnapshot: ({stream, data}) => replaceState(stream, data),
//   });
//   client.connect();
//   const answer = await client.request("chat", {text: "hi"});
//
// It behaves like the Python client (wsroom.client): it sends `hello` with the last resume
// token and its stream positions, answers pings, unpacks batches, drops duplicates by
// offset, and reconnects with full-jitter backoff after the close codes that say so. A gap,
// an epoch change without a welcome, a bad frame, or a silent server drops the socket (with
// a reconnect code, so that the server keeps the session) and the next hello asks again.

const STABLE_AFTER_MS = 10000; // a connection that lasted this long resets the backoff
const SILENCE_BEFORE_WELCOME_MS = 30000;
const CLOSE_GAP = 3010; // sent when we drop the socket: reconnect codes, the session stays
const CLOSE_SILENT = 3012;

/**
 * Tell whether a client reconnects after a close with `code` (same rule as the Python
 * `wsroom.should_reconnect`): 1001, 1006, 1011, 1012, 1013, 3000-3499 and 4000-4499.
 * @param {number} code
 * @returns {boolean}
 */
export function shouldReconnect(code) {
  if ([1001, 1006, 1011, 1012, 1013].includes(code)) return true;
  return (code >= 3000 && code <= 3499) || (code >= 4000 && code <= 4499);
}

/**
 * Full-jitter backoff: a random delay in [0, min(cap, base * 2**attempt)] milliseconds.
 * @param {number} attempt 0 for the first retry
 * @param {number} [base=500]
 * @param {number} [cap=20000]
 * @returns {number}
 */
export function backoffDelay(attempt, base = 500, cap = 20000) {
  return Math.random() * Math.min(cap, base * 2 ** Math.min(attempt, 32));
}

function failure(code, detail = "") {
  const error = new Error(detail ? `${code}: ${detail}` : code);
  error.code = code;
  error.detail = detail;
  return error;
}

class BadFrame extends Error {}

function check(condition, what) {
  if (!condition) throw new BadFrame(what);
}

function position(value, what) {
  check(value !== null && typeof value === "object", what);
  check(value.epoch !== undefined && Number.isInteger(value.offset), what);
  return {epoch: String(value.epoch), offset: value.offset};
}

/**
 * A wsroom client that reconnects, resumes and deduplicates by itself.
 *
 * States (`state`, and `onState(state, info)`): "idle" before `connect()`, then
 * "connecting" (until the first welcome), "connected", "reconnecting" (after a connection
 * ended with a reconnect code), "closed" (for good). `info` is
 * `{resumed, recovered: {stream: bool}, code, reason, session}`.
 */
export class WsroomClient {
  /**
   * @param {string} url the server's ws:// or wss:// URL
   * @param {object} [options]
   * @param {*} [options.auth] sent as `hello.auth`
   * @param {Storage|null} [options.storage] where to keep the resume token and positions
   *   (e.g. `window.sessionStorage`, one per tab) so that a page reload resumes
   * @param {string} [options.storageKey="wsroom"]
   * @param {boolean} [options.restorePositions=false] also present the stored positions
   *   after a reload, so that the server replays only what the page missed: only for apps
   *   that keep their own state across reloads. By default a reloaded page resumes its
   *   session but asks for no stream, so it gets a snapshot of each (its memory is gone)
   * @param {number} [options.minBackoff=500] backoff base, ms
   * @param {number} [options.maxBackoff=20000] backoff cap, ms
   * @param {function(string, object)} [options.onState]
   * @param {function(object)} [options.onMessage] `{stream, epoch, offset, event, data}`,
   *   each message once, in order per stream
   * @param {function(object)} [options.onSnapshot] `{stream, epoch, offset, data}`: replace
   *   what you know of the stream; messages after `offset` follow
   * @param {function(string, Map, object)} [options.onPresence] `(room, roster, frame)`
   * @param {function(object)} [options.onError] error frames that answer no request
   */
  constructor(url, {
    auth = null, storage = null, storageKey = "wsroom", restorePositions = false,
    minBackoff = 500, maxBackoff = 20000,
    onState = null, onMessage = null, onSnapshot = null, onPresence = null, onError = null,
  } = {}) {
    this.url = url;
    this.auth = auth;
    this.minBackoff = minBackoff;
    this.maxBackoff = maxBackoff;
    this._storage = storage;
    this._storageKey = storageKey;
    this._restorePositions = restorePositions;
    this._handlers = {onState, onMessage, onSnapshot, onPresence, onError};
    this._state = "idle";
    this._ws = null;
    this._number = 0; // connection number: requests remember the one they were sent on
    this._welcomedAt = null;
    this._attempt = 0;
    this._retryTimer = null;
    this._silenceTimer = null;
    this._silenceMs = SILENCE_BEFORE_WELCOME_MS;
    this._resumeToken = null;
    this._session = null;
    this._resumed = false;
    this._recovered = {};
    this._positions = new Map(); // stream -> {epoch, offset}
    this._lossy = new Set();
    this._presence = new Map(); // room -> Map member id -> entry
    this._outbox = []; // {frame, resolve, reject, pending?} waiting for a welcome
    this._pending = new Map(); // ref -> {resolve, reject, timer, sentOn}
    this._nextRef = 0;
    this._load();
  }

  /** @returns {string} "idle", "connecting", "connected", "reconnecting" or "closed" */
  get state() { return this._state; }
  /** @returns {string|null} the session id of the last welcome */
  get session() { return this._session; }
  /** @returns {boolean} whether the last welcome continued the previous session */
  get resumed() { return this._resumed; }
  /** @returns {Map<string, {epoch: string, offset: number}>} last position per stream */
  get positions() {
    return new Map([...this._positions].map(([name, p]) => [name, {...p}]));
  }
  /** @returns {Map<string, Map<string, object>>} per room, member id -> roster entry */
  get presence() {
    return new Map([...this._presence].map(([room, roster]) => [room, new Map(roster)]));
  }

  /** Start connecting; the client then reconnects by itself until `close()`. */
  connect() {
    if (this._state !== "idle") return;
    this._setState("connecting");
    this._open();
  }

  /**
   * Close politely and for good: the server ends the session; stored state is cleared.
   * @param {number} [code=1000]
   * @param {string} [reason=""]
   */
  close(code = 1000, reason = "") {
    if (this._state === "closed") return;
    const ws = this._detach();
    if (ws !== null) {
      try { ws.close(code, reason); } catch { ws.close(1000); }
    }
    this._clearStorage();
    this._finish(code, reason);
  }

  /**
   * Send an event. Queued until connected.
   * @param {string} event
   * @param {*} [data=null]
   * @returns {Promise<void>} resolved once written to a connection; rejected (`code`
   *   "closed") if the client closes first
   */
  send(event, data = null) {
    return new Promise((resolve, reject) => {
      this._enqueue({frame: {type: "msg", event, data}, resolve, reject});
    });
  }

  /**
   * Send an event and wait for its reply.
   * @param {string} event
   * @param {*} [data=null]
   * @param {{timeout?: number}} [options] timeout in ms (default 30000)
   * @returns {Promise<*>} the reply's data. Rejected with an Error whose `code` is the
   *   error frame's code, "connection_lost" (the connection it was sent on dropped
   *   before the answer: the server may or may not have handled it), "timeout", or
   *   "closed"
   */
  request(event, data = null, {timeout = 30000} = {}) {
    const ref = `r${++this._nextRef}`;
    return new Promise((resolve, reject) => {
      const pending = {resolve, reject, sentOn: 0, timer: null};
      const item = {frame: {type: "msg", event, data, ref}, resolve: () => {}, reject, pending};
      if (Number.isFinite(timeout)) { // setTimeout fires at once beyond 2**31 - 1 ms
        pending.timer = setTimeout(() => {
          this._pending.delete(ref);
          this._outbox = this._outbox.filter((queued) => queued !== item);
          reject(failure("timeout", `no answer within ${timeout} ms`));
        }, Math.min(timeout, 2 ** 31 - 1));
      }
      this._pending.set(ref, pending);
      this._enqueue(item);
    });
  }

  // ------------------------------------------------------------------ connection

  _open() {
    this._retryTimer = null;
    if (this._state === "closed") return;
    const presented = this._resumeToken !== null;
    let ws;
    try {
      ws = new globalThis.WebSocket(this.url);
    } catch (error) {
      this._finish(1002, String(error && error.message || error)); // a bad URL: final
      return;
    }
    this._ws = ws;
    this._number += 1;
    this._welcomedAt = null;
    this._silenceMs = SILENCE_BEFORE_WELCOME_MS;
    this._armSilence();
    ws.onopen = () => {
      if (this._ws !== ws) return;
      const hello = {type: "hello", v: 1};
      if (this.auth !== null && this.auth !== undefined) hello.auth = this.auth;
      if (this._resumeToken !== null) hello.resume = this._resumeToken;
      if (this._positions.size) hello.streams = Object.fromEntries(this._positions);
      ws.send(JSON.stringify(hello));
    };
    ws.onmessage = (event) => {
      if (this._ws === ws) this._receive(ws, event.data);
    };
    ws.onclose = (event) => {
      if (this._ws === ws) this._ended(this._detach(), event.code, event.reason, presented);
    };
    ws.onerror = () => {}; // a close event follows
  }

  /** Forget the current socket (its late events are ignored); return it. */
  _detach() {
    const ws = this._ws;
    this._ws = null;
    clearTimeout(this._silenceTimer);
    clearTimeout(this._retryTimer);
    this._retryTimer = null;
    const number = this._number;
    for (const [ref, pending] of this._pending) {
      if (pending.sentOn === number && number !== 0) {
        this._pending.delete(ref);
        clearTimeout(pending.timer);
        pending.reject(failure("connection_lost", "the connection ended"));
      }
    }
    return ws;
  }

  /** Drop the socket ourselves (gap, bad frame, silence) and reconnect. */
  _drop(code, why) {
    console.warn(`wsroom: ${why}: reconnecting`);
    const ws = this._detach();
    try {
      ws.close(code); // no reason: a stream name in it could exceed 123 bytes
    } catch { /* already closing */ }
    this._ended(ws, 1006, why, false);
  }

  _ended(ws, code, reason, presented) {
    this._save();
    const lasted = this._welcomedAt === null ? 0 : Date.now() - this._welcomedAt;
    this._welcomedAt = null;
    if (lasted >= STABLE_AFTER_MS) this._attempt = 0;
    if (code === 3500 && presented) {
      // The resume token was refused, not our credentials: start over as a new session
      // (without a token, so a second refusal is final).
      this._resumeToken = null;
      this._positions.clear();
      this._presence.clear();
      this._save();
      this._setState("reconnecting", {code, reason});
      if (this._state !== "closed") this._open(); // the callback may have closed us
      return;
    }
    if (!shouldReconnect(code)) {
      this._clearStorage(); // the server ended the session: the token is useless
      this._finish(code, reason);
      return;
    }
    const delay = backoffDelay(this._attempt, this.minBackoff, this.maxBackoff);
    this._attempt += 1;
    this._setState("reconnecting", {code, reason});
    if (this._state === "closed") return; // the callback called close()
    this._retryTimer = setTimeout(() => this._open(), delay);
  }

  _finish(code, reason) {
    clearTimeout(this._retryTimer);
    this._retryTimer = null;
    for (const pending of this._pending.values()) {
      clearTimeout(pending.timer);
      pending.reject(failure("closed", `the client closed (${code})`));
    }
    this._pending.clear();
    for (const item of this._outbox) item.reject(failure("closed", `the client closed (${code})`));
    this._outbox = [];
    this._setState("closed", {code, reason});
  }

  _armSilence() {
    clearTimeout(this._silenceTimer);
    const ms = this._silenceMs;
    this._silenceTimer = setTimeout(
      () => this._drop(CLOSE_SILENT, `no frame from the server for ${ms} ms`), ms);
  }

  // ---------------------------------------------------------------------- frames

  _receive(ws, raw) {
    this._armSilence();
    if (typeof raw !== "string") return; // the server sends text only
    try {
      for (const line of raw.split("\n")) {
        if (!line) continue;
        const frame = JSON.parse(line);
        check(frame !== null && typeof frame === "object" && typeof frame.type === "string",
          "not a frame");
        if (!this._frame(ws, frame)) return;
        if (this._ws !== ws) return; // closed by a callback
      }
    } catch (error) {
      if (!(error instanceof BadFrame || error instanceof SyntaxError)) throw error;
      this._drop(CLOSE_GAP, "a frame from the server is not valid");
      return;
    }
    this._save();
  }

  /** Handle one frame; false when the socket was dropped. */
  _frame(ws, frame) {
    switch (frame.type) {
      case "ping":
        check("id" in frame, "ping without id");
        ws.send(JSON.stringify({type: "pong", id: frame.id}));
        return true;
      case "msg":
        return this._onMsg(frame);
      case "reply":
      case "error":
        this._onAnswer(frame);
        return true;
      case "snapshot": {
        check(typeof frame.stream === "string", "snapshot without stream");
        const {epoch, offset} = position(frame, "bad snapshot");
        this._positions.set(frame.stream, {epoch, offset});
        this._emit("onSnapshot", {stream: frame.stream, epoch, offset, data: frame.data ?? null});
        return true;
      }
      case "stream":
        check(typeof frame.stream === "string", "stream frame without stream");
        this._positions.set(frame.stream, position(frame, "bad stream frame"));
        if (frame.lossy) this._lossy.add(frame.stream); else this._lossy.delete(frame.stream);
        return true;
      case "left":
        check(typeof frame.stream === "string", "left without stream");
        this._positions.delete(frame.stream);
        this._lossy.delete(frame.stream);
        this._presence.delete(frame.stream);
        return true;
      case "presence":
        this._onPresence(frame);
        return true;
      case "welcome":
        this._onWelcome(ws, frame);
        return true;
      default:
        return true; // frames of a later version: ignored
    }
  }

  _onWelcome(ws, frame) {
    const interval = Number(frame.ping_interval);
    const timeout = Number(frame.pong_timeout);
    const streams = frame.streams;
    check(Number.isFinite(interval) && Number.isFinite(timeout), "welcome without heartbeat");
    check(streams !== null && typeof streams === "object", "welcome without streams");
    const parsed = Object.entries(streams).map(([name, p]) => [name, position(p, "bad welcome"), p]);
    this._silenceMs = (interval + timeout) * 1000;
    this._armSilence();
    this._resumed = this._session !== null && frame.session === this._session;
    this._session = frame.session ?? null;
    this._resumeToken = typeof frame.resume === "string" ? frame.resume : null;
    this._lossy = new Set(parsed.filter(([, , p]) => p.lossy).map(([name]) => name));
    this._recovered = {};
    // The session's streams are exactly these: forget the others (rooms left).
    for (const name of [...this._positions.keys()]) {
      if (!(name in streams)) this._positions.delete(name);
    }
    for (const room of [...this._presence.keys()]) {
      if (!(room in streams)) this._presence.delete(room);
    }
    for (const [name, {epoch, offset}, p] of parsed) {
      this._recovered[name] = Boolean(p.recovered);
      const known = this._positions.get(name);
      if (p.recovered && known && known.epoch === epoch) continue; // dedupe the replay
      this._positions.set(name, {epoch, offset});
    }
    this._welcomedAt = Date.now();
    this._save();
    // Frames queued while disconnected go out now, in order, before anything that the
    // application sends from its onState callback.
    const outbox = this._outbox;
    this._outbox = [];
    for (const item of outbox) {
      if (ws.readyState !== 1) {
        this._outbox.push(item);
        continue;
      }
      ws.send(JSON.stringify(item.frame));
      if (item.pending) item.pending.sentOn = this._number;
      item.resolve();
    }
    this._setState("connected");
  }

  _onMsg(frame) {
    check(typeof frame.stream === "string", "msg without stream");
    const {epoch, offset} = position(frame, "bad msg");
    const stream = frame.stream;
    const known = this._positions.get(stream);
    if (known) {
      if (known.epoch !== epoch) {
        this._drop(CLOSE_GAP, `stream ${stream} changed epoch without a welcome`);
        return false;
      }
      if (offset <= known.offset) return true; // a duplicate
      if (offset !== known.offset + 1 && !this._lossy.has(stream)) {
        this._drop(CLOSE_GAP, `gap in stream ${stream}: ${offset} after ${known.offset}`);
        return false;
      }
    }
    this._positions.set(stream, {epoch, offset});
    this._emit("onMessage", {stream, epoch, offset, event: frame.event ?? "",
      data: frame.data ?? null});
    return true;
  }

  _onAnswer(frame) {
    const pending = this._pending.get(String(frame.ref));
    if (frame.ref === undefined || frame.ref === null || pending === undefined) {
      if (frame.type === "error") this._emit("onError", frame);
      return;
    }
    this._pending.delete(String(frame.ref));
    clearTimeout(pending.timer);
    if (frame.type === "reply") pending.resolve(frame.data ?? null);
    else pending.reject(failure(String(frame.code), String(frame.detail ?? "")));
  }

  _onPresence(frame) {
    check(typeof frame.room === "string", "presence without room");
    const room = frame.room;
    if ("state" in frame) {
      check(Array.isArray(frame.state), "bad presence state");
      this._presence.set(room, new Map(frame.state.map((entry) => [String(entry.id), entry])));
    } else {
      const roster = this._presence.get(room) ?? new Map();
      this._presence.set(room, roster);
      for (const entry of frame.joins ?? []) roster.set(String(entry.id), entry);
      for (const member of frame.leaves ?? []) roster.delete(String(member));
    }
    this._emit("onPresence", room, new Map(this._presence.get(room)), frame);
  }

  // ----------------------------------------------------------------------- helpers

  _enqueue(item) {
    if (this._state === "closed") {
      if (item.pending) {
        clearTimeout(item.pending.timer);
        this._pending.delete(item.frame.ref);
      }
      item.reject(failure("closed", "the client is closed"));
      return;
    }
    const ws = this._ws;
    if (this._state === "connected" && ws !== null && ws.readyState === 1) {
      ws.send(JSON.stringify(item.frame));
      if (item.pending) item.pending.sentOn = this._number;
      item.resolve();
    } else {
      this._outbox.push(item);
    }
  }

  _setState(state, {code = null, reason = ""} = {}) {
    this._state = state;
    this._emit("onState", state, {resumed: this._resumed, recovered: {...this._recovered},
      code, reason, session: this._session});
  }

  /** Call an application callback; its exceptions are reported, never ours to handle. */
  _emit(name, ...args) {
    const handler = this._handlers[name];
    if (!handler) return;
    try {
      handler(...args);
    } catch (error) {
      if (typeof globalThis.reportError === "function") globalThis.reportError(error);
      else console.error(error);
    }
  }

  _load() {
    if (!this._storage) return;
    try {
      const saved = JSON.parse(this._storage.getItem(this._storageKey) ?? "null");
      if (!saved) return;
      this._resumeToken = typeof saved.resume === "string" ? saved.resume : null;
      this._session = saved.session ?? null;
      const positions = this._restorePositions ? saved.positions ?? {} : {};
      for (const [name, p] of Object.entries(positions)) {
        this._positions.set(name, position(p, "stored position"));
      }
    } catch {
      this._resumeToken = null; // unreadable: start as a new session
      this._session = null;
      this._positions.clear();
    }
  }

  _save() {
    if (!this._storage || this._state === "closed") return;
    try {
      this._storage.setItem(this._storageKey, JSON.stringify({resume: this._resumeToken,
        session: this._session, positions: Object.fromEntries(this._positions)}));
    } catch { /* full or disabled: memory only */ }
  }

  _clearStorage() {
    if (!this._storage) return;
    try { this._storage.removeItem(this._storageKey); } catch { /* disabled */ }
  }
}
