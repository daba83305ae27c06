// Turns model output (Markdown) into safe HTML.
//
// Model output is untrusted: it can contain anything a prompt injection put there. Three layers keep it
// inert: markdown-it with raw HTML disabled (tags show as text) and its link validation (no javascript:
// or data: URLs), images rendered as plain links (nothing is fetched unless the person clicks), and
// DOMPurify over the result. The page's Content-Security-Policy (no inline script, no remote origins)
// backs all of them up.
import MarkdownIt from 'markdown-it';
import DOMPurify from 'dompurify';
import hljs from 'highlight.js/lib/common';

const LARGEST_AUTO_HIGHLIGHT = 20000;

const markdown = new MarkdownIt({ html: false, linkify: true, breaks: true, highlight: highlightCode });
const escapeHtml = markdown.utils.escapeHtml;

function highlightCode(code, info) {
  const language = (info || '').trim().split(/\s+/)[0].toLowerCase();
  let highlighted;
  let label = language;
  if (language && hljs.getLanguage(language)) {
    highlighted = hljs.highlight(code, { language, ignoreIllegals: true }).value;
  } else if (code.length <= LARGEST_AUTO_HIGHLIGHT) {
    const guess = hljs.highlightAuto(code);
    highlighted = guess.value;
    label = language || guess.language || '';
  } else {
    highlighted = escapeHtml(code);
  }
  const labelAttribute = label ? ` data-language="${escapeHtml(label)}"` : '';
  return `<pre class="code-block"${labelAttribute}><code class="hljs">${highlighted}</code></pre>`;
}

markdown.renderer.rules.image = (tokens, index, options, env, renderer) => {
  const token = tokens[index];
  const source = token.attrGet('src') || '';
  const alt = renderer.renderInlineAsText(token.children || [], options, env) || 'image';
  return `<a href="${escapeHtml(source)}">[image: ${escapeHtml(alt)}]</a>`;
};

const purifier = DOMPurify(window);
purifier.addHook('afterSanitizeAttributes', (node) => {
  if (node.tagName === 'A') {
    node.setAttribute('target', '_blank');
    node.setAttribute('rel', 'noopener noreferrer nofollow');
  }
});

const SANITIZE_OPTIONS = {
  USE_PROFILES: { html: true },
  FORBID_TAGS: [
    'img', 'picture', 'source', 'video', 'audio', 'track', 'svg', 'math', 'style', 'link', 'meta',
    'base', 'form', 'input', 'button', 'textarea', 'select', 'iframe', 'frame', 'object', 'embed',
  ],
  FORBID_ATTR: ['style', 'srcset', 'id', 'name'],
  ALLOW_DATA_ATTR: false,
  ADD_ATTR: ['data-language', 'target'],
  RETURN_DOM_FRAGMENT: true,
};

// Returns a DocumentFragment holding the rendered, sanitized Markdown with a copy button on each
// code block.
export function renderMarkdown(text) {
  const fragment = purifier.sanitize(markdown.render(text), SANITIZE_OPTIONS);
  for (const block of fragment.querySelectorAll('pre.code-block')) {
    const header = document.createElement('div');
    header.className = 'code-header';
    const language = document.createElement('span');
    language.className = 'code-language';
    language.textContent = block.dataset.language || 'code';
    const copy = document.createElement('button');
    copy.type = 'button';
    copy.className = 'copy-button';
    copy.setAttribute('aria-label', 'Copy code');
    copy.textContent = 'Copy';
    header.append(language, copy);
    block.prepend(header);
  }
  return fragment;
}
