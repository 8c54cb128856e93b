// Many real @verdant-web/store 3.6.3 clients in ONE Node process, for tests that need more
// clients than processes fit on the machine (one driver.mjs process costs ~0.8 s of CPU and
// ~95 MB; the extra clients of a pool cost a fraction of that). Each client has its own
// namespace, so its own IndexedDB database in fake-indexeddb, and its own sync connection,
// as several apps open in one browser would.
//
// Run: node --import ./register.mjs pool.mjs   (stdin: the scenario as JSON; stdout: the result)
//
// stdin:  {"clients": [{"name", "authEndpoint", "library"}...],
//          "expected": {<library>: [every client name of the library, in any pool]},
//          "timeoutMs": N}
// Every client opens and waits for its first sync, puts one item {id: <name>, content:
// <library>}, then the pool waits until every client lists exactly the items of all the
// clients of its library (or the deadline passes). Clients of one library may be spread over
// several pools (processes), hence `expected`.
// stdout: {"ok": bool, "elapsedMs": N, "lists": {<name>: [item ids, sorted]}, "errors": [...]}
import './register.mjs';
import './browser-env.mjs';

const errors = [];
process.on('unhandledRejection', (err) => errors.push(String(err?.stack ?? err)));
for (const method of ['log', 'info', 'warn', 'error', 'debug']) {
	console[method] = (...args) => process.stderr.write(`[pool] ${args.map(String).join(' ')}\n`);
}

const { ClientDescriptor, schema, createMigration } = await import('@verdant-web/store');

const v1 = schema({
	version: 1,
	collections: {
		items: schema.collection({
			name: 'item',
			primaryKey: 'id',
			fields: {
				id: schema.fields.string(),
				content: schema.fields.string({ default: '' }),
			},
		}),
	},
});
const migrations = [createMigration(v1)];

const chunks = [];
for await (const chunk of process.stdin) chunks.push(chunk);
const scenario = JSON.parse(Buffer.concat(chunks).toString('utf8'));
const deadline = Date.now() + (scenario.timeoutMs ?? 60000);
const started = Date.now();
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

async function waitForFirstSync(client) {
	while (Date.now() < deadline) {
		const info = await client.meta.localReplica.get();
		if (info.lastSyncedLogicalTime) return;
		await sleep(20);
	}
	throw new Error('no first sync before the deadline');
}

async function ids(client) {
	const entities = await client.items.findAll().execute();
	return entities
		.filter((e) => e && !e.deleted)
		.map((e) => e.get('id'))
		.sort();
}

const expected = {};
for (const [library, names] of Object.entries(scenario.expected)) expected[library] = [...names].sort();

const opened = await Promise.all(
	scenario.clients.map(async (c) => {
		const descriptor = new ClientDescriptor({
			schema: v1,
			migrations,
			namespace: `pool-${process.pid}-${c.name}`,
			sync: {
				authEndpoint: c.authEndpoint,
				initialPresence: {},
				defaultProfile: {},
				initialTransport: 'realtime',
				autoStart: true,
			},
			indexedDb: globalThis.indexedDB,
			log: () => {},
		});
		const client = await descriptor.open();
		await waitForFirstSync(client);
		await client.items.put({ id: c.name, content: c.library });
		return { ...c, client };
	}),
);

const lists = {};
let ok = false;
while (Date.now() < deadline) {
	ok = true;
	for (const c of opened) {
		lists[c.name] = await ids(c.client);
		if (JSON.stringify(lists[c.name]) !== JSON.stringify(expected[c.library])) ok = false;
	}
	if (ok) break;
	await sleep(100);
}
const elapsedMs = Date.now() - started;
for (const c of opened) {
	c.client.sync.stop();
	await c.client.close();
}
process.stdout.write(JSON.stringify({ ok, elapsedMs, lists, errors }));
process.exit(0);
