// The relay's chat page: talks to POST /chat (NDJSON) with the conversation it keeps in this browser.
import 'highlight.js/styles/github.css';
import './style.css';
import { readNdjson, UnreadableRecordError } from './ndjson.js';
import { renderMarkdown } from './render.js';
import * as store from './store.js';

const CHAT_URL = 'chat';
const MODELS_URL = 'v1/models';
const USAGE_URL = 'v1/usage/me';
const USAGE_REFRESH_DELAY_MS = 1000;
const TITLE_LENGTH = 48;
const NARROW_LAYOUT = window.matchMedia('(max-width: 760px)');

const elements = {
  app: document.getElementById('app'),
  sidebar: document.getElementById('sidebar'),
  scrim: document.getElementById('scrim'),
  openSidebar: document.getElementById('open-sidebar'),
  closeSidebar: document.getElementById('close-sidebar'),
  newChat: document.getElementById('new-chat'),
  conversationList: document.getElementById('conversation-list'),
  model: document.getElementById('model'),
  settings: document.getElementById('settings'),
  accessKey: document.getElementById('access-key'),
  systemPrompt: document.getElementById('system-prompt'),
  usage: document.getElementById('usage'),
  conversation: document.getElementById('conversation'),
  messages: document.getElementById('messages'),
  emptyState: document.getElementById('empty-state'),
  composer: document.getElementById('composer'),
  message: document.getElementById('message'),
  send: document.getElementById('send'),
  stop: document.getElementById('stop'),
};

const state = {
  defaultModel: document.body.dataset.defaultModel || '',
  models: [],
  conversations: store.loadConversations(),
  currentId: store.loadCurrentId(),
  accessKey: store.loadAccessKey(),
  // The answer being streamed: { controller, conversation, reply }, or null.
  streaming: null,
  composing: false,
  renderQueued: new Set(),
};

// ---------------------------------------------------------------------------------------------------
// Conversations

function currentConversation() {
  let conversation = state.conversations.find((item) => item.id === state.currentId);
  if (!conversation) {
    conversation = state.conversations[0] || addConversation();
    state.currentId = conversation.id;
  }
  return conversation;
}

function addConversation() {
  const previous = state.conversations.find((item) => item.id === state.currentId);
  const conversation = store.newConversation(previous ? previous.model : state.defaultModel);
  state.conversations.unshift(conversation);
  return conversation;
}

function persist() {
  store.saveConversations(state.conversations);
  store.saveCurrentId(state.currentId);
}

function startNewChat() {
  const current = currentConversation();
  if (current.messages.length > 0) {
    const conversation = addConversation();
    state.currentId = conversation.id;
    persist();
  }
  showConversation();
  closeSidebar();
  elements.message.focus();
}

function openConversation(id) {
  state.currentId = id;
  persist();
  showConversation();
  closeSidebar();
}

function deleteConversation(id) {
  if (state.streaming && state.streaming.conversation.id === id) state.streaming.controller.abort();
  state.conversations = state.conversations.filter((item) => item.id !== id);
  if (state.currentId === id) state.currentId = state.conversations[0] ? state.conversations[0].id : null;
  currentConversation();
  persist();
  showConversation();
}

function renderConversationList() {
  const list = elements.conversationList;
  list.replaceChildren();
  const ordered = [...state.conversations].sort((a, b) => b.updatedAt - a.updatedAt);
  for (const conversation of ordered) {
    const item = document.createElement('li');
    item.className = 'conversation-item';
    const open = document.createElement('button');
    open.type = 'button';
    open.className = 'conversation-open';
    open.textContent = conversation.title;
    open.title = conversation.title;
    if (conversation.id === state.currentId) open.setAttribute('aria-current', 'true');
    open.addEventListener('click', () => openConversation(conversation.id));
    const remove = document.createElement('button');
    remove.type = 'button';
    remove.className = 'conversation-delete icon-button';
    remove.setAttribute('aria-label', `Delete conversation: ${conversation.title}`);
    remove.textContent = '✕';
    remove.addEventListener('click', () => deleteConversation(conversation.id));
    item.append(open, remove);
    list.append(item);
  }
}

// ---------------------------------------------------------------------------------------------------
// Messages

const AUTHOR_NAMES = { user: 'You', assistant: 'Assistant' };

function messageElement(message, isLast) {
  const item = document.createElement('li');
  item.className = `message ${message.role}`;
  const author = document.createElement('div');
  author.className = 'author';
  author.textContent = AUTHOR_NAMES[message.role] || message.role;
  const body = document.createElement('div');
  body.className = 'body';
  item.append(author, body);
  fillMessage(item, message, isLast);
  return item;
}

function fillMessage(item, message, isLast) {
  const body = item.querySelector('.body');
  if (message.role === 'assistant') {
    body.replaceChildren(renderMarkdown(message.content));
  } else {
    body.textContent = message.content;
  }
  item.dataset.status = message.status || 'done';
  item.setAttribute('aria-busy', message.status === 'streaming' ? 'true' : 'false');
  item.querySelector('.notice')?.remove();
  item.querySelector('.message-actions')?.remove();
  if (message.status === 'streaming' && !message.content) {
    const typing = document.createElement('p');
    typing.className = 'notice typing';
    typing.textContent = 'Waiting for the model…';
    item.append(typing);
  } else if (message.status === 'stopped') {
    const stopped = document.createElement('p');
    stopped.className = 'notice stopped';
    stopped.textContent = 'Stopped.';
    item.append(stopped);
  } else if (message.status === 'error') {
    const error = document.createElement('p');
    error.className = 'notice error';
    error.textContent = message.error || 'Something went wrong.';
    item.append(error);
  }
  if (message.role === 'assistant' && isLast && message.status !== 'streaming') {
    const actions = document.createElement('div');
    actions.className = 'message-actions';
    const retry = document.createElement('button');
    retry.type = 'button';
    retry.className = 'retry-button';
    retry.textContent = 'Retry';
    retry.addEventListener('click', retryLastTurn);
    actions.append(retry);
    item.append(actions);
  }
}

function showConversation() {
  const conversation = currentConversation();
  const { messages } = conversation;
  elements.messages.replaceChildren(
    ...messages.map((message, index) => messageElement(message, index === messages.length - 1)),
  );
  elements.emptyState.hidden = messages.length > 0;
  elements.systemPrompt.value = conversation.systemPrompt || '';
  selectModel(conversation.model);
  renderConversationList();
  scrollToEnd(true);
}

function updateMessage(conversation, message) {
  if (conversation.id !== state.currentId) return;
  const index = conversation.messages.indexOf(message);
  const item = elements.messages.children[index];
  if (!item) return;
  const follow = isNearEnd();
  fillMessage(item, message, index === conversation.messages.length - 1);
  if (follow) scrollToEnd(false);
}

// Re-renders a streaming message at most once per frame, however fast the deltas arrive.
function scheduleUpdate(conversation, message) {
  if (state.renderQueued.has(message)) return;
  state.renderQueued.add(message);
  window.requestAnimationFrame(() => {
    state.renderQueued.delete(message);
    updateMessage(conversation, message);
  });
}

function isNearEnd() {
  const area = elements.conversation;
  return area.scrollHeight - area.scrollTop - area.clientHeight < 80;
}

function scrollToEnd(always) {
  if (always || isNearEnd()) elements.conversation.scrollTop = elements.conversation.scrollHeight;
}

function announce(text) {
  let status = document.getElementById('announcer');
  if (!status) {
    status = document.createElement('div');
    status.id = 'announcer';
    status.className = 'visually-hidden';
    status.setAttribute('role', 'status');
    document.body.append(status);
  }
  status.textContent = text;
}

// ---------------------------------------------------------------------------------------------------
// Talking to the relay

function authorizationHeaders() {
  return state.accessKey ? { Authorization: `Bearer ${state.accessKey}` } : {};
}

function requestMessages(conversation) {
  const messages = [];
  const systemPrompt = (conversation.systemPrompt || '').trim();
  if (systemPrompt) messages.push({ role: 'system', content: systemPrompt });
  for (const message of conversation.messages) {
    // Failed answers with no text are local notices, not part of what the model said.
    if (message.role === 'assistant' && !message.content) continue;
    if (message.role === 'user' || message.role === 'assistant') {
      messages.push({ role: message.role, content: message.content });
    }
  }
  return messages;
}

async function readErrorMessage(response) {
  let text = '';
  try {
    text = await response.text();
  } catch {
    return '';
  }
  for (const line of text.split('\n')) {
    if (!line.trim()) continue;
    try {
      const record = JSON.parse(line);
      if (record && typeof record.content === 'string' && record.error) return record.content;
      if (record && record.error && typeof record.error.message === 'string') return record.error.message;
      if (record && typeof record.message === 'string') return record.message;
    } catch {
      return text.slice(0, 200);
    }
  }
  return '';
}

function joinSentences(first, detail) {
  if (!detail) return first;
  return `${first} (The relay said: ${detail.replace(/\s+$/, '')})`;
}

function describeHttpFailure(status, detail, retryAfter) {
  switch (status) {
    case 401:
    case 403:
      return 'The relay did not accept your access key. Enter the right key under Settings, then press Retry.';
    case 429: {
      const wait = retryAfter ? `Wait ${retryAfter} seconds` : 'Wait a little';
      return joinSentences(`Too many requests right now: the relay or the model provider is limiting how fast you can ask. ${wait}, then press Retry.`, detail);
    }
    case 413:
      return joinSentences('This conversation is too long for the relay to accept. Start a new chat or shorten your message.', detail);
    case 400:
    case 422:
      return joinSentences('The relay refused this request.', detail);
    case 502:
    case 503:
      return joinSentences('The model provider is not reachable right now. Try again in a moment with Retry.', detail);
    case 504:
      return joinSentences('The model provider took too long to answer. Try again with Retry.', detail);
    default:
      return joinSentences(`The relay answered with an error (HTTP ${status}). Try again with Retry.`, detail);
  }
}

function describeStreamError(record) {
  const detail = typeof record.content === 'string' ? record.content : '';
  return detail ? `The answer was cut off: ${detail}` : 'The answer was cut off by an upstream error. Press Retry to ask again.';
}

async function runTurn(conversation) {
  const reply = { role: 'assistant', content: '', status: 'streaming' };
  conversation.messages.push(reply);
  conversation.updatedAt = Date.now();
  persist();
  if (conversation.id === state.currentId) showConversation();

  const controller = new AbortController();
  state.streaming = { controller, conversation, reply };
  setStreamingControls(true);
  try {
    const body = { messages: requestMessages(conversation) };
    if (conversation.model) body.model = conversation.model;
    const response = await fetch(CHAT_URL, {
      method: 'POST',
      headers: { 'Content-Type': 'application/json', ...authorizationHeaders() },
      body: JSON.stringify(body),
      signal: controller.signal,
    });
    if (!response.ok) {
      const detail = await readErrorMessage(response);
      reply.status = 'error';
      reply.error = describeHttpFailure(response.status, detail, response.headers.get('Retry-After'));
      if (response.status === 401 || response.status === 403) askForKey();
      return;
    }
    for await (const record of readNdjson(response.body)) {
      if (record.done) break;
      if (record.error) {
        reply.status = 'error';
        reply.error = describeStreamError(record);
      } else if (typeof record.content === 'string' && record.content) {
        reply.content += record.content;
        scheduleUpdate(conversation, reply);
      }
    }
    if (reply.status === 'streaming') reply.status = 'done';
  } catch (error) {
    if (controller.signal.aborted) {
      reply.status = 'stopped';
    } else if (error instanceof UnreadableRecordError) {
      reply.status = 'error';
      reply.error = error.message;
    } else {
      reply.status = 'error';
      reply.error = reply.content
        ? 'The connection to the relay broke off mid-answer. Press Retry to ask again.'
        : 'Could not reach the relay. Check your connection, then press Retry.';
    }
  } finally {
    if (reply.status === 'streaming') reply.status = 'done';
    state.streaming = null;
    conversation.updatedAt = Date.now();
    persist();
    setStreamingControls(false);
    updateMessage(conversation, reply);
    announce(reply.status === 'error' ? reply.error : `Answer ${reply.status === 'stopped' ? 'stopped' : 'complete'}.`);
    // The ledger writes the answer's row just after it ends: read the totals a moment later.
    setTimeout(loadUsage, USAGE_REFRESH_DELAY_MS);
  }
}

function sendMessage() {
  if (state.streaming) return;
  const text = elements.message.value.trim();
  if (!text) return;
  const conversation = currentConversation();
  if (!state.accessKey) {
    askForKey('Enter the relay\'s access key under Settings first; your message is still in the box.');
    return;
  }
  conversation.messages.push({ role: 'user', content: text });
  if (store.isUntitled(conversation)) conversation.title = text.replace(/\s+/g, ' ').slice(0, TITLE_LENGTH);
  elements.message.value = '';
  resizeComposer();
  runTurn(conversation);
}

function retryLastTurn() {
  if (state.streaming) return;
  const conversation = currentConversation();
  const last = conversation.messages[conversation.messages.length - 1];
  if (last && last.role === 'assistant') conversation.messages.pop();
  const previous = conversation.messages[conversation.messages.length - 1];
  if (!previous || previous.role !== 'user') {
    showConversation();
    return;
  }
  runTurn(conversation);
}

function stopAnswer() {
  if (state.streaming) state.streaming.controller.abort();
}

function setStreamingControls(streaming) {
  elements.send.hidden = streaming;
  elements.stop.hidden = !streaming;
  if (streaming) {
    if (document.activeElement === elements.send) elements.stop.focus();
  } else if (document.activeElement === elements.stop || document.activeElement === document.body) {
    elements.message.focus();
  }
}

// ---------------------------------------------------------------------------------------------------
// Access key, model and system prompt

function askForKey(reason) {
  elements.settings.open = true;
  elements.accessKey.setAttribute('aria-invalid', 'true');
  elements.accessKey.focus();
  if (reason) announce(reason);
  if (reason) showLocalNotice(reason);
}

function showLocalNotice(text) {
  let notice = document.getElementById('local-notice');
  if (!notice) {
    notice = document.createElement('p');
    notice.id = 'local-notice';
    notice.className = 'notice error local-notice';
    notice.setAttribute('role', 'alert');
    elements.conversation.append(notice);
  }
  notice.textContent = text;
}

function clearLocalNotice() {
  document.getElementById('local-notice')?.remove();
}

function saveKeyFromField() {
  const key = elements.accessKey.value.trim();
  if (key === state.accessKey) return false;
  state.accessKey = key;
  store.saveAccessKey(key);
  elements.accessKey.removeAttribute('aria-invalid');
  clearLocalNotice();
  if (key) {
    loadModels();
    loadUsage();
  }
  return true;
}

function selectModel(model) {
  const wanted = model || state.defaultModel;
  const options = [...elements.model.options].map((option) => option.value);
  if (wanted && !options.includes(wanted)) addModelOption(wanted);
  elements.model.value = wanted || (options[0] ?? '');
}

function addModelOption(name) {
  const option = document.createElement('option');
  option.value = name;
  option.textContent = name || 'Relay default';
  elements.model.append(option);
}

function fillModels(names) {
  const unique = [...new Set(names.filter((name) => typeof name === 'string'))];
  if (state.defaultModel && !unique.includes(state.defaultModel)) unique.unshift(state.defaultModel);
  if (unique.length === 0) unique.push('');
  state.models = unique;
  elements.model.replaceChildren();
  for (const name of unique) addModelOption(name);
  selectModel(currentConversation().model);
}

// Lists the models from GET /v1/models when the relay offers it; otherwise the default model alone.
async function loadModels() {
  if (!state.accessKey) return;
  try {
    const response = await fetch(MODELS_URL, { headers: authorizationHeaders() });
    if (!response.ok) return;
    const payload = await response.json();
    if (payload && Array.isArray(payload.data)) fillModels(payload.data.map((model) => model && model.id));
  } catch {
    // No model list (older relay, network hiccup): the default model stays selectable.
  }
}

// This key's usage today and this month (UTC), from the relay's ledger (GET /v1/usage/me).
function describeUsage(label, period) {
  const tokens = period.prompt_tokens + period.completion_tokens;
  const cost = typeof period.cost === 'number' ? `, ${period.cost.toFixed(4)} spent` : '';
  const requests = `${period.requests.toLocaleString()} request${period.requests === 1 ? '' : 's'}`;
  return `${label}: ${requests}, ${tokens.toLocaleString()} tokens${cost}`;
}

async function loadUsage() {
  if (!state.accessKey) return;
  try {
    const response = await fetch(USAGE_URL, { headers: authorizationHeaders() });
    if (!response.ok) return;
    const usage = await response.json();
    if (!usage || !usage.today || !usage.this_month) return;
    elements.usage.textContent = `This key's usage: ${describeUsage('today', usage.today)}; `
      + `${describeUsage('this month', usage.this_month)}.`;
    elements.usage.hidden = false;
  } catch {
    // No ledger (an older relay, a database that cannot be read now): the line stays as it was.
  }
}

// ---------------------------------------------------------------------------------------------------
// Layout and input

function resizeComposer() {
  const box = elements.message;
  box.style.height = 'auto';
  box.style.height = `${Math.min(box.scrollHeight, 200)}px`;
}

function openSidebar() {
  elements.app.classList.add('sidebar-open');
  elements.scrim.hidden = false;
  elements.openSidebar.setAttribute('aria-expanded', 'true');
  elements.newChat.focus();
}

function closeSidebar() {
  if (!elements.app.classList.contains('sidebar-open')) return;
  elements.app.classList.remove('sidebar-open');
  elements.scrim.hidden = true;
  elements.openSidebar.setAttribute('aria-expanded', 'false');
  if (NARROW_LAYOUT.matches) elements.openSidebar.focus();
}

async function copyText(text) {
  if (navigator.clipboard && window.isSecureContext) {
    try {
      await navigator.clipboard.writeText(text);
      return true;
    } catch {
      // Permission refused: fall back to the selection-based copy below.
    }
  }
  const area = document.createElement('textarea');
  area.value = text;
  area.setAttribute('readonly', '');
  area.className = 'offscreen';
  document.body.append(area);
  area.select();
  let copied = false;
  try {
    copied = document.execCommand('copy');
  } finally {
    area.remove();
  }
  return copied;
}

async function onMessagesClick(event) {
  const button = event.target.closest('.copy-button');
  if (!button) return;
  const code = button.closest('pre')?.querySelector('code');
  if (!code) return;
  const copied = await copyText(code.textContent);
  button.textContent = copied ? 'Copied' : 'Copy failed';
  announce(copied ? 'Code copied to the clipboard.' : 'Could not copy; select the code and copy it by hand.');
  window.setTimeout(() => {
    button.textContent = 'Copy';
  }, 2000);
}

function onMessageKeydown(event) {
  if (event.key !== 'Enter' || event.shiftKey) return;
  // Enter confirms the candidate of an input method (Chinese, Japanese...) while composing: never send.
  if (event.isComposing || event.keyCode === 229 || state.composing) return;
  event.preventDefault();
  sendMessage();
}

function wireEvents() {
  elements.composer.addEventListener('submit', (event) => {
    event.preventDefault();
    sendMessage();
  });
  elements.message.addEventListener('keydown', onMessageKeydown);
  elements.message.addEventListener('compositionstart', () => {
    state.composing = true;
  });
  elements.message.addEventListener('compositionend', () => {
    // Some browsers fire the confirming Enter's keydown right after compositionend.
    window.setTimeout(() => {
      state.composing = false;
    }, 0);
  });
  elements.message.addEventListener('input', resizeComposer);
  elements.stop.addEventListener('click', stopAnswer);
  elements.newChat.addEventListener('click', startNewChat);
  elements.openSidebar.addEventListener('click', openSidebar);
  elements.closeSidebar.addEventListener('click', closeSidebar);
  elements.scrim.addEventListener('click', closeSidebar);
  document.addEventListener('keydown', (event) => {
    if (event.key === 'Escape') closeSidebar();
  });
  elements.messages.addEventListener('click', onMessagesClick);

  elements.accessKey.addEventListener('keydown', (event) => {
    if (event.key !== 'Enter' || event.isComposing) return;
    event.preventDefault();
    saveKeyFromField();
    if (state.accessKey) {
      elements.settings.open = false;
      elements.message.focus();
    }
  });
  elements.accessKey.addEventListener('blur', saveKeyFromField);
  elements.accessKey.addEventListener('change', saveKeyFromField);

  elements.systemPrompt.addEventListener('input', () => {
    const conversation = currentConversation();
    conversation.systemPrompt = elements.systemPrompt.value;
    persist();
  });
  elements.model.addEventListener('change', () => {
    const conversation = currentConversation();
    conversation.model = elements.model.value;
    persist();
  });
  window.addEventListener('storage', (event) => {
    // Another tab changed the saved conversations: pick them up unless this tab is mid-answer.
    if (event.key && event.key.startsWith('relay.') && !state.streaming) {
      state.conversations = store.loadConversations();
      state.accessKey = store.loadAccessKey();
      elements.accessKey.value = state.accessKey;
      showConversation();
    }
  });
}

function start() {
  elements.accessKey.value = state.accessKey;
  if (!state.accessKey) elements.settings.open = true;
  fillModels([]);
  currentConversation();
  persist();
  showConversation();
  wireEvents();
  resizeComposer();
  loadModels();
  loadUsage();
  document.body.dataset.ready = 'true';
  if (state.accessKey) elements.message.focus();
  else elements.accessKey.focus();
}

start();
