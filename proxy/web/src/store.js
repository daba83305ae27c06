// The page's memory, in this browser's localStorage: the access key, the saved conversations and which
// one is open. The relay itself stays stateless; each request carries the conversation.
const KEY_STORAGE = 'relay.accessKey';
const CONVERSATIONS_STORAGE = 'relay.conversations.v1';
const CURRENT_STORAGE = 'relay.currentConversation';
const NEW_TITLE = 'Untitled';

function read(name) {
  try {
    return window.localStorage.getItem(name);
  } catch {
    return null; // storage disabled (private mode, policy): the page still works, it just forgets
  }
}

function write(name, value) {
  try {
    if (value === null) window.localStorage.removeItem(name);
    else window.localStorage.setItem(name, value);
    return true;
  } catch {
    return false; // quota exceeded or storage disabled; the caller shows nothing, the chat goes on
  }
}

export function loadAccessKey() {
  return read(KEY_STORAGE) || '';
}

export function saveAccessKey(key) {
  write(KEY_STORAGE, key ? key : null);
}

export function newConversation(model) {
  return {
    id: `c${Date.now().toString(36)}${Math.random().toString(36).slice(2, 8)}`,
    title: NEW_TITLE,
    model: model || '',
    systemPrompt: '',
    messages: [],
    updatedAt: Date.now(),
  };
}

export function isUntitled(conversation) {
  return conversation.title === NEW_TITLE;
}

function isConversation(value) {
  return value && typeof value.id === 'string' && Array.isArray(value.messages);
}

export function loadConversations() {
  let parsed = [];
  try {
    parsed = JSON.parse(read(CONVERSATIONS_STORAGE) || '[]');
  } catch {
    parsed = []; // a corrupted entry must not brick the page
  }
  const conversations = Array.isArray(parsed) ? parsed.filter(isConversation) : [];
  for (const conversation of conversations) {
    for (const message of conversation.messages) {
      // An answer that was streaming when the page closed is as finished as it will ever be.
      if (message.status === 'streaming') message.status = 'stopped';
    }
  }
  return conversations;
}

export function saveConversations(conversations) {
  return write(CONVERSATIONS_STORAGE, JSON.stringify(conversations));
}

export function loadCurrentId() {
  return read(CURRENT_STORAGE);
}

export function saveCurrentId(id) {
  write(CURRENT_STORAGE, id);
}
