// Differential oracle for verdant_trio/patches.py: runs cases through the real
// @verdant-web/common `applyOperations` and reports what went over the wire.
//
// usage: node apply_patches.mjs <path to @verdant-web/common package dir>
// stdin: one JSON array of cases per line, each {base?: any, ops: Operation[]}
//        (an absent `base` is `undefined`).
// stdout: one JSON array of results per input line, each
//        {ok: true, json: string | null, refs: string}  (json null: result undefined)
//        {ok: false, error: string, refs: string}       (applyOperations threw)
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { createInterface } from 'node:readline';
import { pathToFileURL } from 'node:url';

const dir = process.argv[2];
if (!dir) {
	console.error('usage: node apply_patches.mjs <@verdant-web/common dir>');
	process.exit(2);
}
const pkg = JSON.parse(readFileSync(join(dir, 'package.json'), 'utf8'));
const entry = pkg.exports?.['.']?.import ?? pkg.module ?? pkg.main;
const common = await import(pathToFileURL(join(dir, entry)).href);
const { applyOperations } = common;

// listCheck logs every list patch applied to a non-list; keep stderr for real failures.
console.error = () => {};

function run(testCase) {
	const deletedRefs = [];
	const base = 'base' in testCase ? testCase.base : undefined;
	try {
		const result = applyOperations(base, testCase.ops, deletedRefs);
		const json = JSON.stringify(result);
		return {
			ok: true,
			json: json === undefined ? null : json,
			refs: JSON.stringify(deletedRefs),
		};
	} catch (error) {
		return { ok: false, error: String(error), refs: JSON.stringify(deletedRefs) };
	}
}

process.stdout.write(JSON.stringify({ ready: true, version: pkg.version }) + '\n');
const lines = createInterface({ input: process.stdin, crlfDelay: Infinity });
for await (const line of lines) {
	if (!line.trim()) continue;
	const results = JSON.parse(line).map(run);
	process.stdout.write(JSON.stringify(results) + '\n');
}
