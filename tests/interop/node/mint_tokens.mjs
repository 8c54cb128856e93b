// Mints sync tokens with Node's `jsonwebtoken`, as Verdant's own server `TokenProvider` does
// (`jwt.sign({sub, lib, url, file, role, type}, secret, {expiresIn})`): raw UTF-8 in the payload,
// where PyJWT writes \uXXXX escapes. Used by tests/test_cluster_routing.py.
//
// stdin: {"secret": S, "url": U, "user": X, "ids": [library ids...]}
// stdout: a JSON array of tokens, one per id, in order.
import { createSecretKey } from 'node:crypto';
import jwt from 'jsonwebtoken';

const chunks = [];
for await (const chunk of process.stdin) chunks.push(chunk);
const { secret, url, user, ids } = JSON.parse(Buffer.concat(chunks).toString('utf8'));
// A KeyObject, not the string: given a string, jsonwebtoken 9 first tries it as a private key
// (~0.5 ms a token); the tokens are the same.
const key = createSecretKey(Buffer.from(secret, 'utf8'));
const tokens = ids.map((lib) =>
	jwt.sign({ sub: user, lib, url, file: undefined, role: undefined, type: 0 }, key, {
		expiresIn: '1h',
	}),
);
process.stdout.write(JSON.stringify(tokens));
