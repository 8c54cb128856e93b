// Use as: node --import ./register.mjs driver.mjs
// Installs the loader hooks in hooks.mjs (see there for why).
import { register } from 'node:module';

if (!globalThis.__verdantInteropHooksRegistered) {
	register('./hooks.mjs', import.meta.url);
	globalThis.__verdantInteropHooksRegistered = true;
}
