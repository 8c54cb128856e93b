// Minimal browser-like globals so @verdant-web/store@3.6.3 runs in Node 20.
// Must be imported BEFORE the store (the store captures window.indexedDB at
// module evaluation time).
import 'fake-indexeddb/auto';
import { WebSocket as NodeWebSocket } from 'ws';

const g = globalThis;

// --- window: the global object itself, with EventTarget methods -----------
if (typeof g.window === 'undefined') {
	const windowEvents = new EventTarget();
	g.addEventListener = windowEvents.addEventListener.bind(windowEvents);
	g.removeEventListener = windowEvents.removeEventListener.bind(windowEvents);
	g.dispatchEvent = windowEvents.dispatchEvent.bind(windowEvents);
	g.window = g;
	g.self = g;
}

// --- document: only what the store touches (visibility events) -------------
if (typeof g.document === 'undefined') {
	const documentEvents = new EventTarget();
	g.document = {
		visibilityState: 'visible',
		hidden: false,
		addEventListener: documentEvents.addEventListener.bind(documentEvents),
		removeEventListener: documentEvents.removeEventListener.bind(documentEvents),
		dispatchEvent: documentEvents.dispatchEvent.bind(documentEvents),
	};
}

// --- location / history: reload() is called on IDB versionchange ----------
if (typeof g.location === 'undefined') {
	g.location = {
		href: 'http://localhost/',
		origin: 'http://localhost',
		protocol: 'http:',
		host: 'localhost',
		hostname: 'localhost',
		pathname: '/',
		search: '',
		hash: '',
		reload() {
			process.stderr.write('[browser-env] location.reload() called (ignored)\n');
		},
	};
}
if (typeof g.history === 'undefined') {
	g.history = { replaceState() {}, pushState() {} };
}

// --- WebSocket: Node 20 has none; ws implements the WHATWG event API -------
if (typeof g.WebSocket === 'undefined') {
	g.WebSocket = NodeWebSocket;
}

// --- FileReader: used by the store to turn File/Blob into ArrayBuffer ------
if (typeof g.FileReader === 'undefined') {
	class FileReaderShim extends EventTarget {
		static EMPTY = 0;
		static LOADING = 1;
		static DONE = 2;
		readyState = 0;
		result = null;
		error = null;
		onload = null;
		onerror = null;
		onloadend = null;

		_read(blob, convert) {
			this.readyState = 1;
			Promise.resolve()
				.then(() => convert(blob))
				.then(
					(result) => {
						this.result = result;
						this.readyState = 2;
						this._fire('load');
						this._fire('loadend');
					},
					(error) => {
						this.error = error;
						this.readyState = 2;
						this._fire('error');
						this._fire('loadend');
					},
				);
		}
		_fire(type) {
			const event = new Event(type);
			const handler = this['on' + type];
			if (typeof handler === 'function') handler.call(this, event);
			this.dispatchEvent(event);
		}
		readAsArrayBuffer(blob) {
			this._read(blob, (b) => b.arrayBuffer());
		}
		readAsText(blob) {
			this._read(blob, (b) => b.text());
		}
		readAsDataURL(blob) {
			this._read(blob, async (b) => {
				const buf = Buffer.from(await b.arrayBuffer());
				return `data:${b.type || 'application/octet-stream'};base64,${buf.toString('base64')}`;
			});
		}
		abort() {}
	}
	g.FileReader = FileReaderShim;
}

// Node 20 provides fetch, FormData, Blob, File, URL.createObjectURL, structuredClone.
for (const name of ['fetch', 'FormData', 'Blob', 'File', 'structuredClone']) {
	if (typeof g[name] === 'undefined') {
		throw new Error(`browser-env: this Node has no global ${name}; Node >= 20 is required`);
	}
}
