// The game table: plain DOM code on top of wsroom's browser client.
//
// The client does the hard part (resume with stored positions, exactly-once delivery,
// snapshots when a gap cannot be replayed, reconnect with backoff on reconnect codes
// only). This page only renders state, and renders it idempotently: every chat line,
// roll and whisper is keyed by its id, so applying one twice changes nothing.
import { WsroomClient } from "/wsroom/wsroom.js";

const $ = (selector) => document.querySelector(selector);
const STORE = "wsroom-game";

const state = {
  me: null,                 // {code, player_id, credential, role, name}
  client: null,
  players: new Map(),       // player id (string) -> {player_id, name, role, kicked}
  roster: new Map(),        // member id -> presence entry ({id, status, info, ...})
  initiative: { order: [], current: 0 },
  log: new Map(),           // "chat:12" / "roll:7" -> item
  whispers: new Map(),      // whisper id -> item
  rosterHistory: [],        // [{id, status}] every presence change seen (tests read it)
};
window.game = state;

// ---------------------------------------------------------------- lobby

async function api(path, { method = "GET", body, credential } = {}) {
  const headers = { "content-type": "application/json" };
  if (credential) headers.authorization = `Bearer ${credential}`;
  const response = await fetch(path, { method, headers, body: body && JSON.stringify(body) });
  const data = await response.json().catch(() => ({}));
  if (!response.ok) {
    const detail = typeof data.detail === "string" ? data.detail
      : Array.isArray(data.detail) ? data.detail.map((d) => d.msg).join("; ") : response.statusText;
    throw Object.assign(new Error(detail), { status: response.status });
  }
  return data;
}

function enter(me) {
  localStorage.setItem(STORE, JSON.stringify(me));
  start(me);
}

$("#create").onsubmit = async (event) => {
  event.preventDefault();
  const form = new FormData(event.target);
  try {
    const me = await api("/api/games", { method: "POST", body: { name: form.get("name") } });
    enter({ ...me, name: form.get("name") });
  } catch (error) { $("#lobby-error").textContent = error.message; }
};

$("#join").onsubmit = async (event) => {
  event.preventDefault();
  const form = new FormData(event.target);
  const code = String(form.get("code")).trim().toUpperCase();
  try {
    const me = await api(`/api/games/${encodeURIComponent(code)}/players`,
      { method: "POST", body: { name: form.get("name") } });
    enter({ ...me, name: form.get("name") });
  } catch (error) { $("#lobby-error").textContent = error.message; }
};

$("#leave").onclick = () => {
  state.client?.close(1000, "left the table");
  localStorage.removeItem(STORE);
  location.reload();
};

// ---------------------------------------------------------------- the table

function start(me) {
  state.me = me;
  $("#lobby").hidden = true;
  $("#table").hidden = false;
  $("#leave").hidden = false;
  $("#code").textContent = me.code;
  document.body.classList.toggle("gm", me.role === "gm");
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  state.client = new WsroomClient(`${scheme}://${location.host}/ws`, {
    auth: { credential: me.credential },
    storage: sessionStorage,                       // a reload resumes the session
    storageKey: `wsroom:${me.code}:${me.player_id}`,
    onState: showState,
    onMessage: onMessage,
    onSnapshot: onSnapshot,
    onPresence: onPresence,
    onError: (frame) => showError(frame.detail || frame.code),
  });
  state.client.connect();
}

function showState(name, info = {}) {
  const label = name === "connected" && info.resumed ? "resumed" : name;
  $("#state").textContent = label;
  $("#state").dataset.state = label;
  if (name === "closed" && info.code === 4501) {   // kicked: do not come back
    removed();
  } else if (name === "closed" && info.code === 3500) {
    // Refused: kicked while this page was reconnecting, or the game is gone.
    api("/api/me", { credential: state.me.credential }).catch((error) => {
      if (error.status === 403) removed();
    });
  }
}

function removed() {
  localStorage.removeItem(STORE);
  $("#table").hidden = true;
  $("#removed").hidden = false;
}

function showError(text) {
  $("#error").textContent = text;
}

function onSnapshot({ stream, data }) {
  if (!data) return;
  if (stream === "@inbox") {
    state.whispers.clear();
    for (const whisper of data.whispers || []) state.whispers.set(whisper.id, whisper);
    renderWhispers();
    return;
  }
  state.players = new Map(data.players.map((p) => [String(p.player_id), p]));
  $("#scene").textContent = data.game.scene || "";
  state.initiative = normalizeInitiative(data.game.initiative);
  state.log.clear();
  for (const chat of data.chat) state.log.set(`chat:${chat.id}`, { kind: "chat", ...chat });
  for (const roll of data.rolls) state.log.set(`roll:${roll.id}`, { kind: "roll", ...roll });
  renderAll();
}

function onMessage({ stream, event, data }) {
  if (stream === "@inbox") {
    if (event === "whisper") { state.whispers.set(data.id, data); renderWhispers(); }
    return;
  }
  switch (event) {
    case "chat": state.log.set(`chat:${data.id}`, { kind: "chat", ...data }); renderLog(); break;
    case "roll": state.log.set(`roll:${data.id}`, { kind: "roll", ...data }); renderLog(); break;
    case "scene": $("#scene").textContent = data.text; break;
    case "initiative": state.initiative = normalizeInitiative(data); renderInitiative(); break;
    case "kicked": {
      const player = state.players.get(String(data.player_id));
      if (player) player.kicked = true;
      renderRoster();
      break;
    }
    default: break;
  }
}

function onPresence(room, roster, frame) {
  for (const entry of frame.state || frame.joins || []) {
    state.rosterHistory.push({ id: entry.id, status: entry.status });
    if (!state.players.has(entry.id)) {
      state.players.set(entry.id, { player_id: entry.id, name: entry.info.name,
                                    role: entry.info.role, kicked: false });
    }
  }
  for (const id of frame.leaves || []) state.rosterHistory.push({ id, status: "gone" });
  state.roster = new Map(roster);
  renderRoster();
}

function normalizeInitiative(value) {
  const order = (value && value.order) || [];
  return { order: order.map((p) => (typeof p === "object" ? p : { player_id: p })),
           current: (value && value.current) || 0 };
}

// ---------------------------------------------------------------- rendering

function renderAll() { renderLog(); renderRoster(); renderInitiative(); renderWhispers(); }

function line(text, className) {
  const li = document.createElement("li");
  li.textContent = text;
  if (className) li.className = className;
  return li;
}

function renderLog() {
  const items = [...state.log.values()].sort((a, b) => (a.at < b.at ? -1 : a.at > b.at ? 1
    : a.kind.localeCompare(b.kind) || a.id - b.id));
  const list = $("#log");
  const atBottom = list.scrollTop + list.clientHeight >= list.scrollHeight - 4;
  list.replaceChildren(...items.map((item) => {
    const li = item.kind === "chat"
      ? line(`${item.name}: ${item.text}`)
      : line(`${item.name} rolled ${item.expr}: [${item.rolls.join(", ")}]`
             + `${item.modifier ? (item.modifier > 0 ? " +" : " ") + item.modifier : ""}`
             + ` = ${item.total}`, "roll");
    li.dataset.key = `${item.kind}:${item.id}`;
    return li;
  }));
  if (atBottom) list.scrollTop = list.scrollHeight;
}

function renderRoster() {
  const list = $("#roster");
  const select = $("#whisper-form select");
  const chosen = select.value;
  list.replaceChildren();
  select.replaceChildren();
  for (const [id, player] of state.players) {
    if (player.kicked) continue;
    const entry = state.roster.get(id);
    const status = entry ? entry.status : "gone";
    const li = line(`${player.name}${player.role === "gm" ? " (GM)" : ""} — ${status}`);
    li.dataset.status = status;
    li.dataset.member = id;
    if (state.me.role === "gm" && player.role !== "gm") {
      const kick = document.createElement("button");
      kick.textContent = "Kick";
      kick.dataset.kick = id;
      kick.onclick = () => act("kick", { player_id: Number(id) });
      const init = document.createElement("button");
      init.textContent = "+ initiative";
      init.onclick = () => {
        const order = state.initiative.order.map((p) => Number(p.player_id));
        if (!order.includes(Number(id))) order.push(Number(id));
        act("initiative", { order, current: state.initiative.current });
      };
      li.append(kick, init);
      select.append(new Option(player.name, id));
    }
    list.append(li);
  }
  if (chosen) select.value = chosen;
  renderInitiative();
}

function renderInitiative() {
  const { order, current } = state.initiative;
  $("#initiative").replaceChildren(...order.map((p, index) => {
    const name = p.name || state.players.get(String(p.player_id))?.name || `#${p.player_id}`;
    return line(name, index === current ? "current" : "");
  }));
}

function renderWhispers() {
  const items = [...state.whispers.values()].sort((a, b) => a.id - b.id);
  $("#whispers").replaceChildren(...items.map((w) => {
    const li = line(`${w.from ? w.from + ": " : ""}${w.text}`);
    li.dataset.key = `whisper:${w.id}`;
    return li;
  }));
}

// ---------------------------------------------------------------- actions

// Send an event and wait for the server's answer; an `error` frame is shown. Returns
// whether the server accepted it.
async function act(event, data) {
  showError("");
  try {
    await state.client.request(event, data);
    return true;
  } catch (error) {
    showError(error.message || String(error));
    return false;
  }
}

$("#chat").onsubmit = async (event) => {
  event.preventDefault();
  const input = event.target.elements.text;
  if (await act("chat", { text: input.value })) input.value = "";
};

$("#roll").onsubmit = async (event) => {
  event.preventDefault();
  await act("roll", { expr: event.target.elements.expr.value });
};

$("#scene-form").onsubmit = async (event) => {
  event.preventDefault();
  await act("scene", { text: event.target.elements.text.value });
};

$("#next-turn").onclick = () => {
  const { order, current } = state.initiative;
  if (!order.length) return;
  act("initiative", { order: order.map((p) => Number(p.player_id)),
                      current: (current + 1) % order.length });
};

$("#whisper-form").onsubmit = async (event) => {
  event.preventDefault();
  const form = event.target.elements;
  if (await act("whisper", { to: Number(form.to.value), text: form.text.value })) {
    form.text.value = "";
  }
};

// ---------------------------------------------------------------- boot

(async () => {
  const saved = JSON.parse(localStorage.getItem(STORE) || "null");
  if (!saved) return;
  try {
    await api("/api/me", { credential: saved.credential });  // still a player here?
    start(saved);
  } catch (error) {
    localStorage.removeItem(STORE);
    if (error.status === 403) $("#removed").hidden = false;
  }
})();
