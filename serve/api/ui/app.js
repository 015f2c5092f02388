// CineVivid web UI: sign in, write a prompt, watch progress over SSE, play, download and delete
// videos. Plain browser JavaScript, no build step, no external URL: everything it loads comes
// from this server (the page's Content-Security-Policy allows nothing else).
"use strict";

// The page's <base href> is "<mount>/ui/"; the API lives at "<mount>/".
const API = new URL("..", document.baseURI).href;
const TOKEN_KEY = "cinevivid.token";
const USER_KEY = "cinevivid.user";
const STAGE_NAMES = {text_encoder: "Text encoder", transformer: "Transformer (denoising)", vae: "VAE decode",
                     tts: "Voice-over", mux: "MP4"};

const $ = (id) => document.getElementById(id);
const state = {watch: null, playerUrl: null, downloadUrl: null, playing: null};

// ---------- errors ----------
class ApiError extends Error {
  constructor(status, code, message, retryAfter) {
    super(message);
    this.status = status;
    this.code = code;
    this.retryAfter = retryAfter;
  }
}

async function errorFrom(resp) {
  let envelope = null;
  try {
    envelope = (await resp.json()).error;
  } catch (_) { /* not the JSON error envelope */ }
  const message = envelope && envelope.message
    ? envelope.message
    : `the server answered ${resp.status} ${resp.statusText}`.trim();
  return new ApiError(resp.status, envelope ? envelope.code : null, message, resp.headers.get("Retry-After"));
}

// A sentence for the user: what went wrong and what to do.
function describe(err, context) {
  if (!(err instanceof ApiError)) return `Something went wrong: ${err.message || err}`;
  if (err.status === 0) return err.message;
  if (err.status === 401 && context === "login") return "Wrong username or password.";
  if (err.status === 401) return "Your session has expired or is no longer valid: please sign in again.";
  if (err.status === 429) {
    const s = parseInt(err.retryAfter, 10);
    const wait = Number.isFinite(s) ? `Try again in ${s} second${s === 1 ? "" : "s"}.` : "Try again later.";
    if (err.code === "too_many_failed_attempts") {
      return `Too many failed sign-in attempts. ${wait} Trying earlier makes the wait longer.`;
    }
    return `Too many requests (${err.message}). ${wait}`;
  }
  return err.message.charAt(0).toUpperCase() + err.message.slice(1);
}

function showMessage(text, kind = "error") {
  const el = $("message");
  el.textContent = text;
  el.className = kind;
  el.hidden = false;
}

function clearMessage() {
  $("message").hidden = true;
  $("message").textContent = "";
}

function showError(err, context) {
  if (err && err.name === "AbortError") return;
  showMessage(describe(err, context), "error");
  if (err instanceof ApiError && err.status === 401 && context !== "login") signOut(false);
}

// ---------- API ----------
async function api(path, {method = "GET", body, auth = true, raw = false, signal} = {}) {
  const headers = {};
  const token = sessionStorage.getItem(TOKEN_KEY);
  if (auth && token) headers["Authorization"] = `Bearer ${token}`;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  let resp;
  try {
    resp = await fetch(API + path, {method, headers, signal,
                                    body: body === undefined ? undefined : JSON.stringify(body)});
  } catch (e) {
    if (e.name === "AbortError") throw e;
    throw new ApiError(0, "network_error", `Cannot reach the CineVivid server (${e.message}).`, null);
  }
  if (!resp.ok) throw await errorFrom(resp);
  return raw ? resp : resp.json();
}

// Server-Sent Events from a fetch() body (EventSource cannot send the Authorization header):
// yields {type, data} per event; comment lines (keep-alives) are skipped.
async function* readSSE(body) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buf = "";
  let type = "";
  let data = [];
  try {
    for (;;) {
      const {value, done} = await reader.read();
      if (done) break;
      buf += value;
      for (;;) {
        const m = /\r\n|\r|\n/.exec(buf);
        if (!m) break;
        if (m[0] === "\r" && m.index === buf.length - 1) break;  // maybe a "\r\n" split across chunks
        const line = buf.slice(0, m.index);
        buf = buf.slice(m.index + m[0].length);
        if (line === "") {
          if (data.length) yield {type: type || "message", data: JSON.parse(data.join("\n"))};
          type = "";
          data = [];
        } else if (!line.startsWith(":")) {
          const i = line.indexOf(":");
          const field = i < 0 ? line : line.slice(0, i);
          let val = i < 0 ? "" : line.slice(i + 1);
          if (val.startsWith(" ")) val = val.slice(1);
          if (field === "event") type = val;
          else if (field === "data") data.push(val);
        }
      }
    }
  } finally {
    reader.releaseLock();
  }
}

// ---------- sign in / out ----------
async function signIn(ev) {
  ev.preventDefault();
  clearMessage();
  const username = $("username").value.trim();
  const button = $("signin");
  button.disabled = true;
  try {
    const tok = await api("auth/login", {method: "POST", auth: false,
                                         body: {username, password: $("password").value}});
    sessionStorage.setItem(TOKEN_KEY, tok.access_token);
    sessionStorage.setItem(USER_KEY, username);
    $("password").value = "";
    await enterApp();
  } catch (e) {
    showError(e, "login");
  } finally {
    button.disabled = false;
  }
}

function signOut(clear = true) {
  sessionStorage.removeItem(TOKEN_KEY);
  sessionStorage.removeItem(USER_KEY);
  stopWatching();
  resetPlayer();
  $("app").hidden = true;
  $("whoami").hidden = true;
  $("signout").hidden = true;
  $("signin-panel").hidden = false;
  if (clear) clearMessage();
}

async function enterApp() {
  $("signin-panel").hidden = true;
  $("app").hidden = false;
  $("whoami").textContent = `Signed in as ${sessionStorage.getItem(USER_KEY) || "you"}`;
  $("whoami").hidden = false;
  $("signout").hidden = false;
  try {
    await loadVoices();
    await loadVideos();
  } catch (e) {
    showError(e);
  }
}

// ---------- voices ----------
async function loadVoices() {
  const select = $("voice");
  select.replaceChildren();
  const voices = (await api("v1/voices")).data;
  if (!voices.length) {
    select.append(new Option("(no voices available)", ""));
    select.disabled = true;
    return;
  }
  select.disabled = false;
  select.append(new Option("(default voice)", ""));
  for (const v of voices) {
    const opt = new Option(`${v.name} (${v.provider})`, v.voice_id);
    opt.dataset.provider = v.provider;
    select.append(opt);
  }
}

// ---------- create + watch ----------
async function createVideo(ev) {
  ev.preventDefault();
  clearMessage();
  const body = {prompt: $("prompt").value.trim(), size: $("size").value, seconds: String($("seconds").value)};
  const text = $("voiceover").value.trim();
  if (text) {
    body.voiceover = {text};
    const opt = $("voice").selectedOptions[0];
    if (opt && opt.value) {
      body.voiceover.voice = opt.value;
      body.voiceover.provider = opt.dataset.provider;
    }
  }
  const button = $("generate");
  button.disabled = true;
  try {
    const video = await api("v1/videos", {method: "POST", body});
    loadVideos().catch(showError);
    await watch(video);
  } catch (e) {
    showError(e);
  } finally {
    button.disabled = false;
  }
}

function stopWatching() {
  if (state.watch) state.watch.abort();
  state.watch = null;
}

function setProgress(progress, status, detail) {
  const p = Math.max(0, Math.min(100, Math.round(Number(progress) || 0)));
  $("progress-bar").value = p;
  $("progress-text").textContent = `${p} %`;
  if (status) $("progress-status").textContent = detail ? `${status} · ${detail}` : status;
}

function stageItem(stage) {
  let li = document.querySelector(`#stages li[data-stage="${CSS.escape(stage)}"]`);
  if (!li) {
    li = document.createElement("li");
    li.dataset.stage = stage;
    li.append(Object.assign(document.createElement("span"), {className: "stage-name",
                                                              textContent: STAGE_NAMES[stage] || stage}));
    li.append(Object.assign(document.createElement("span"), {className: "stage-state"}));
    $("stages").append(li);
  }
  return li;
}

function onEvent({type, data}, view) {
  if (data.status) view.status = data.status;
  let detail = "";
  if (type === "stage" && data.stage) {
    const li = stageItem(data.stage);
    li.className = data.stage_status || "";
    li.querySelector(".stage-state").textContent = data.stage_status || "";
    detail = `${STAGE_NAMES[data.stage] || data.stage} ${data.stage_status || ""}`.trim();
  } else if (type === "step") {
    const li = stageItem(data.stage || "transformer");
    li.className = "started";
    li.querySelector(".stage-state").textContent = `step ${data.step} of ${data.total_steps}`;
    detail = `step ${data.step} of ${data.total_steps}`;
  } else if (type === "status" && data.status === "failed" && data.error) {
    detail = data.error.message;
  }
  setProgress(data.progress, (view.status || "").replace("_", " "), detail);
}

async function watch(video) {
  stopWatching();
  const ctl = new AbortController();
  state.watch = ctl;
  $("progress-panel").hidden = false;
  $("progress-prompt").textContent = video.prompt || "";
  $("stages").replaceChildren();
  const view = {status: video.status};
  setProgress(video.progress, video.status.replace("_", " "));
  try {
    const resp = await api(`v1/videos/${encodeURIComponent(video.id)}/events`, {raw: true, signal: ctl.signal});
    for await (const ev of readSSE(resp.body)) onEvent(ev, view);
    // the stream ends with the job: read the final record
    const done = await api(`v1/videos/${encodeURIComponent(video.id)}`, {signal: ctl.signal});
    setProgress(done.progress, done.status.replace("_", " "),
                done.status === "failed" && done.error ? done.error.message : "");
    if (done.status === "completed") {
      await play(done);
    } else if (done.status === "failed") {
      showMessage(`The video failed: ${done.error ? done.error.message : "no reason given"}`);
    }
  } catch (e) {
    if (e.name === "AbortError") return;
    if (e instanceof ApiError && e.status === 404) {
      setProgress($("progress-bar").value, "deleted");
      return;
    }
    throw e;
  } finally {
    if (state.watch === ctl) state.watch = null;
  }
  loadVideos().catch(showError);
}

// ---------- play / download / delete ----------
async function contentBlob(id) {
  const resp = await api(`v1/videos/${encodeURIComponent(id)}/content?variant=video`, {raw: true});
  return resp.blob();
}

function resetPlayer() {
  const player = $("player");
  player.pause();
  player.removeAttribute("src");
  player.load();
  if (state.playerUrl) URL.revokeObjectURL(state.playerUrl);
  state.playerUrl = null;
  state.playing = null;
  $("player-panel").hidden = true;
}

async function play(video) {
  const blob = await contentBlob(video.id);
  resetPlayer();
  state.playerUrl = URL.createObjectURL(blob);
  state.playing = video.id;
  const player = $("player");
  player.src = state.playerUrl;
  $("player-caption").textContent = `${video.prompt || ""} · ${video.size} · ${video.seconds} s` +
    (video.has_audio ? " · with voice-over" : "");
  $("player-panel").hidden = false;
  player.play().catch(() => { /* autoplay may be blocked; the controls are there */ });
}

async function download(video) {
  const blob = await contentBlob(video.id);
  if (state.downloadUrl) URL.revokeObjectURL(state.downloadUrl);
  state.downloadUrl = URL.createObjectURL(blob);
  const a = document.createElement("a");
  a.href = state.downloadUrl;
  a.download = `${video.id}.mp4`;
  document.body.append(a);
  a.click();
  a.remove();
}

async function remove(video) {
  await api(`v1/videos/${encodeURIComponent(video.id)}`, {method: "DELETE"});
  if (state.playing === video.id) resetPlayer();
  showMessage(`Deleted “${video.prompt || video.id}”.`, "info");
  await loadVideos();
}

// ---------- the list ----------
let videosById = new Map();

function cell(text, className) {
  const td = document.createElement("td");
  td.textContent = text;
  if (className) td.className = className;
  return td;
}

function button(label, action, id) {
  const b = document.createElement("button");
  b.type = "button";
  b.textContent = label;
  b.dataset.action = action;
  b.dataset.id = id;
  b.className = action === "delete" ? "danger small" : "secondary small";
  return b;
}

async function loadVideos() {
  const list = await api("v1/videos?limit=50&order=desc");
  videosById = new Map(list.data.map((v) => [v.id, v]));
  const rows = list.data.map((v) => {
    const tr = document.createElement("tr");
    tr.dataset.id = v.id;
    tr.append(cell(v.prompt || "", "prompt"));
    let status = v.status.replace("_", " ");
    if (v.status === "in_progress" || v.status === "queued") status += ` (${v.progress} %)`;
    const st = cell(status, `status ${v.status}`);
    if (v.status === "failed" && v.error) st.title = v.error.message;
    tr.append(st, cell(v.size), cell(v.seconds), cell(new Date(v.created_at * 1000).toLocaleString()));
    const actions = document.createElement("td");
    actions.className = "actions";
    if (v.status === "completed") actions.append(button("Play", "play", v.id), button("Download", "download", v.id));
    else if (v.status !== "failed") actions.append(button("Watch", "watch", v.id));
    actions.append(button("Delete", "delete", v.id));
    tr.append(actions);
    return tr;
  });
  document.querySelector("#videos tbody").replaceChildren(...rows);
  $("no-videos").hidden = rows.length > 0;
  $("videos").hidden = rows.length === 0;
}

async function onListClick(ev) {
  const b = ev.target.closest("button[data-action]");
  if (!b) return;
  const video = videosById.get(b.dataset.id);
  if (!video) return;
  clearMessage();
  b.disabled = true;
  try {
    if (b.dataset.action === "play") await play(video);
    else if (b.dataset.action === "download") await download(video);
    else if (b.dataset.action === "watch") await watch(video);
    else if (b.dataset.action === "delete") await remove(video);
  } catch (e) {
    showError(e);
  } finally {
    b.disabled = false;
  }
}

// ---------- start ----------
document.addEventListener("DOMContentLoaded", () => {
  $("signin-form").addEventListener("submit", signIn);
  $("signout").addEventListener("click", () => signOut(true));
  $("create-form").addEventListener("submit", createVideo);
  $("refresh").addEventListener("click", () => { clearMessage(); loadVideos().catch(showError); });
  $("videos").addEventListener("click", onListClick);
  if (sessionStorage.getItem(TOKEN_KEY)) enterApp();
});
