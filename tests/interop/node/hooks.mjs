// Module loader hooks for running @verdant-web/store@3.6.3 in plain Node.
//
// The store's ESM build does `import { WeakEvent } from 'weak-event'`, but
// weak-event is CommonJS and re-exports its members through tslib's
// __exportStar, which Node's CJS named-export detection cannot see, so Node
// refuses the named import. We intercept ESM imports of such packages and
// serve a tiny generated ESM facade that require()s the real CommonJS module
// and re-exports every own enumerable key by name.
//
// Registered by register.mjs (node --import ./register.mjs driver.mjs).
import { createRequire } from 'node:module';
import { fileURLToPath } from 'node:url';

const CJS_FACADE_PACKAGES = new Set(['weak-event']);
const FACADE_MARK = 'verdant-interop-cjs-facade';

export async function resolve(specifier, context, nextResolve) {
	const resolved = await nextResolve(specifier, context);
	const fromEsm =
		context.conditions === undefined || context.conditions.includes('import');
	if (CJS_FACADE_PACKAGES.has(specifier) && fromEsm) {
		const url = new URL(resolved.url);
		url.searchParams.set(FACADE_MARK, '1');
		return { ...resolved, url: url.href, format: 'module', shortCircuit: true };
	}
	return resolved;
}

export async function load(url, context, nextLoad) {
	if (url.startsWith('file:') && url.includes(FACADE_MARK)) {
		const realUrl = new URL(url);
		realUrl.search = '';
		const realPath = fileURLToPath(realUrl);
		// Inspect the export names here (plain require, no hooks involved).
		const mod = createRequire(realUrl.href)(realPath);
		const names = Object.keys(mod).filter(
			(n) => n !== 'default' && n !== '__esModule' && /^[A-Za-z_$][\w$]*$/.test(n),
		);
		const lines = [
			`import { createRequire } from 'node:module';`,
			`const mod = createRequire(${JSON.stringify(realUrl.href)})(${JSON.stringify(realPath)});`,
			`export default mod;`,
			...names.map((n) => `export const ${n} = mod[${JSON.stringify(n)}];`),
		];
		return { format: 'module', source: lines.join('\n'), shortCircuit: true };
	}
	return nextLoad(url, context);
}
