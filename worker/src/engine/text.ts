/**
 * Text side of the engine: the checkpoint's tokenizer (@huggingface/tokenizers), its chat template
 * (@huggingface/jinja), incremental UTF-8-safe detokenisation and stop-string cutting for streaming.
 */
import { Template } from '@huggingface/jinja';
import { Tokenizer } from '@huggingface/tokenizers';

import { parseJson } from './config';

export class TextCodec {
  private readonly tok: Tokenizer;
  private readonly template?: Template;
  private readonly special: Record<string, unknown>;

  constructor(tokenizerJson: string | object, tokenizerConfig?: string | object) {
    const tj = parseJson(tokenizerJson, 'tokenizer.json');
    const tc = tokenizerConfig ? parseJson(tokenizerConfig, 'tokenizer_config.json') : {};
    this.tok = new Tokenizer(tj, tc);
    this.special = tc;
    const tpl = tc.chat_template;
    if (typeof tpl === 'string') this.template = new Template(tpl);
  }

  encode(text: string): number[] {
    return this.tok.encode(text, { add_special_tokens: false }).ids;
  }

  decode(ids: number[]): string {
    if (ids.length === 0) return '';
    return this.tok.decode(ids, { skip_special_tokens: true, clean_up_tokenization_spaces: false });
  }

  /** A single token's text as shown in logprobs (special tokens included). */
  tokenText(id: number): string {
    return this.tok.decode([id], { skip_special_tokens: false, clean_up_tokenization_spaces: false });
  }

  tokenId(token: string): number | undefined {
    return this.tok.token_to_id(token);
  }

  applyChatTemplate(messages: { role: string; content: string }[]): string {
    if (!this.template) throw new Error('tokenizer_config.json has no chat_template');
    const str = (v: unknown) => (typeof v === 'string' ? v : typeof v === 'object' && v && 'content' in v ? String((v as { content: unknown }).content) : '');
    return this.template.render({
      messages,
      add_generation_prompt: true,
      bos_token: str(this.special.bos_token),
      eos_token: str(this.special.eos_token),
    });
  }
}

/**
 * Streams text for a growing list of token ids without ever splitting a UTF-8 character: the text of the newest
 * tokens is decoded together with a few earlier ones, and held back while it ends in an incomplete sequence (U+FFFD).
 */
export class IncrementalDetokenizer {
  private ids: number[] = [];
  private prefix = 0; // start of the window decoded for context
  private read = 0; // tokens whose text was already returned

  constructor(private readonly codec: TextCodec) {}

  push(id: number): string {
    this.ids.push(id);
    const before = this.codec.decode(this.ids.slice(this.prefix, this.read));
    const now = this.codec.decode(this.ids.slice(this.prefix));
    if (now.length > before.length && !now.endsWith('\uFFFD')) {
      this.prefix = this.read;
      this.read = this.ids.length;
      return now.slice(before.length);
    }
    return '';
  }

  /** Whatever is still held back (e.g. a generation that ended inside a character). */
  flush(): string {
    const before = this.codec.decode(this.ids.slice(this.prefix, this.read));
    const now = this.codec.decode(this.ids.slice(this.prefix));
    this.prefix = this.read = this.ids.length;
    return now.length > before.length ? now.slice(before.length) : '';
  }
}

/**
 * Cuts generated text before the first stop string. Text that might still become a stop string is held back
 * until it cannot.
 */
export class StopCutter {
  private text = '';
  private emitted = 0;
  private readonly maxLen: number;

  constructor(private readonly stops: string[]) {
    this.maxLen = stops.reduce((m, s) => Math.max(m, s.length), 0);
  }

  /** Adds text; returns what may be emitted now and whether a stop string was hit. */
  push(delta: string): { text: string; stopped: boolean } {
    this.text += delta;
    if (!this.stops.length) return this.take(this.text.length, false);
    const from = Math.max(0, this.emitted - this.maxLen + 1);
    let hit = -1;
    for (const s of this.stops) {
      if (!s) continue;
      const i = this.text.indexOf(s, from);
      if (i >= 0 && (hit < 0 || i < hit)) hit = i;
    }
    if (hit >= 0) return this.take(hit, true);
    // hold back the longest suffix that is a prefix of some stop string
    let hold = 0;
    for (const s of this.stops)
      for (let k = Math.min(s.length - 1, this.text.length); k > hold; k--)
        if (this.text.endsWith(s.slice(0, k))) { hold = k; break; }
    return this.take(this.text.length - hold, false);
  }

  /** Remaining held-back text at the end of a generation that did not stop on a string. */
  flush(): string {
    return this.take(this.text.length, false).text;
  }

  private take(upTo: number, stopped: boolean): { text: string; stopped: boolean } {
    const end = Math.max(upTo, this.emitted);
    const out = this.text.slice(this.emitted, end);
    this.emitted = end;
    return { text: out, stopped };
  }
}
