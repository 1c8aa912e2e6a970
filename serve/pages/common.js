// Shared by the chat and Q&A pages: the API key, calls to the gateway's API, SSE streaming
// and feedback buttons. Plain JS, no libraries, nothing fetched from the internet.
"use strict";

// The pages live next to the API: /chat -> /v1/..., /strict/chat -> /strict/v1/...
const ROOT = location.pathname.replace(/\/[^/]*$/, "");

function apiKey() { return localStorage.getItem("aero.key") || ""; }

function headers() {
  const h = {"Content-Type": "application/json"};
  if (apiKey()) h["Authorization"] = "Bearer " + apiKey();
  return h;
}

class APIFailure extends Error {
  constructor(status, message, code) { super(message); this.status = status; this.code = code; }
}

async function failure(resp) {
  let message = `HTTP ${resp.status}`, code = null;
  try { const body = await resp.json(); message = body.error.message; code = body.error.code; } catch (e) {}
  if (resp.status === 401) message = "The server needs an API key: " + message;
  if (resp.status === 429 || resp.status === 503) message = "The server is busy; try again in a moment. (" + message + ")";
  return new APIFailure(resp.status, message, code);
}

async function api(path, body) {
  const resp = await fetch(ROOT + path, body === undefined ? {headers: headers()}
                                                          : {method: "POST", headers: headers(), body: JSON.stringify(body)});
  if (!resp.ok) throw await failure(resp);
  return resp.json();
}

// POST a streaming chat completion; onDelta(index, text) per piece. Resolves to {id, finish}.
async function streamChat(body, onDelta, signal) {
  const resp = await fetch(ROOT + "/v1/chat/completions", {method: "POST", headers: headers(),
                                                           body: JSON.stringify({...body, stream: true}), signal});
  if (!resp.ok) throw await failure(resp);
  const reader = resp.body.getReader(), decoder = new TextDecoder();
  let buffer = "", id = null;
  const finish = {};
  for (;;) {
    const {value, done} = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, {stream: true});
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const line = buffer.slice(0, cut).trim();
      buffer = buffer.slice(cut + 2);
      if (!line.startsWith("data: ")) continue;
      const data = line.slice(6);
      if (data === "[DONE]") return {id, finish};
      const chunk = JSON.parse(data);
      if (chunk.error) throw new APIFailure(400, chunk.error.message, chunk.error.code);
      id = chunk.id || id;
      for (const c of chunk.choices || []) {
        if (c.delta && c.delta.content) onDelta(c.index, c.delta.content);
        if (c.finish_reason) finish[c.index] = c.finish_reason;
      }
    }
  }
  return {id, finish};
}

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v; else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c);
  return node;
}

// Thumbs up / down with an optional comment for answer `index` of reply `id`.
function feedbackBar(id, index) {
  const comment = el("input", {class: "comment", placeholder: "comment (optional)", maxlength: "2000"});
  const status = el("span", {class: "fb-status"});
  const send = async (rating) => {
    try {
      await api("/v1/feedback", {id, index, rating, comment: comment.value || null});
      status.textContent = rating === "up" ? "Thanks: rated good" : "Thanks: rated bad";
      bar.classList.add("sent");
    } catch (e) { status.textContent = e.message; status.classList.add("error"); }
  };
  const bar = el("div", {class: "feedback"},
                 el("button", {class: "thumb-up", title: "thumbs up", onclick: () => send("up")}, "Good"),
                 el("button", {class: "thumb-down", title: "thumbs down", onclick: () => send("down")}, "Bad"),
                 comment, status);
  return bar;
}

function keyBox() {
  const input = document.getElementById("key");
  input.value = apiKey();
  input.addEventListener("change", () => localStorage.setItem("aero.key", input.value.trim()));
}
