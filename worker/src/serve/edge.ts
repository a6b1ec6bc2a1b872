/**
 * Runs a job on an in-worker engine: every (prompt, sample) pair in turn, as OutEvents. The generator's
 * return value is the exact token usage, including what was produced before a client abort.
 */
import type { Engine } from '../engine/types';
import type { GenerationJob, OutEvent, TokenUsage } from './job';
import { usageOf } from './job';

export async function* runOnEdge(engine: Engine, job: GenerationJob, signal?: AbortSignal): AsyncGenerator<OutEvent, TokenUsage> {
  if (!job.promptIds) throw new Error('edge jobs carry token ids');
  let promptTokens = 0;
  let completionTokens = 0;
  for (let p = 0; p < job.promptIds.length; p++) {
    for (let s = 0; s < job.n; s++) {
      if (signal?.aborted) return usageOf(promptTokens, completionTokens);
      const index = p * job.n + s;
      // Samples of one prompt differ by seed; a greedy request gives n identical samples, as OpenAI does.
      const params = job.params.seed !== undefined ? { ...job.params, seed: job.params.seed + s } : job.params;
      for await (const ev of engine.generate(job.promptIds[p], params, signal)) {
        if (ev.type === 'text') {
          if (ev.text !== '' || ev.logprobs?.length) yield { type: 'delta', index, text: ev.text, ...(ev.logprobs ? { logprobs: ev.logprobs } : {}) };
        } else {
          // The prompt is processed once per sample but billed once per prompt, as OpenAI bills n > 1.
          if (s === 0) promptTokens += ev.promptTokens;
          completionTokens += ev.completionTokens;
          if (!signal?.aborted) yield { type: 'finish', index, reason: ev.finishReason };
        }
      }
    }
  }
  return usageOf(promptTokens, completionTokens);
}
