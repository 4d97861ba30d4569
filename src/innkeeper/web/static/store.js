// Browser persistence: characters and chats in IndexedDB (avatars can be megabytes, too big for
// localStorage), small settings in localStorage.

const DB_NAME = "innkeeper";
const DB_VERSION = 1;
let dbPromise = null;

function openDb() {
  if (!dbPromise) {
    dbPromise = new Promise((resolve, reject) => {
      const req = indexedDB.open(DB_NAME, DB_VERSION);
      req.onupgradeneeded = () => {
        const db = req.result;
        if (!db.objectStoreNames.contains("characters")) db.createObjectStore("characters", { keyPath: "id" });
        if (!db.objectStoreNames.contains("chats")) {
          const chats = db.createObjectStore("chats", { keyPath: "id" });
          chats.createIndex("charId", "charId");
        }
      };
      req.onsuccess = () => resolve(req.result);
      req.onerror = () => reject(req.error);
    });
  }
  return dbPromise;
}

async function run(storeName, mode, fn) {
  const db = await openDb();
  return new Promise((resolve, reject) => {
    const tx = db.transaction(storeName, mode);
    const result = fn(tx.objectStore(storeName));
    tx.oncomplete = () => resolve(result && "result" in result ? result.result : undefined);
    tx.onerror = () => reject(tx.error);
    tx.onabort = () => reject(tx.error);
  });
}

export const db = {
  all: (store) => run(store, "readonly", (s) => s.getAll()),
  get: (store, id) => run(store, "readonly", (s) => s.get(id)),
  put: (store, value) => run(store, "readwrite", (s) => s.put(value)),
  del: (store, id) => run(store, "readwrite", (s) => s.delete(id)),
};

export function newId() {
  if (crypto.randomUUID) return crypto.randomUUID();
  return Date.now().toString(36) + Math.random().toString(36).slice(2);
}

export const settings = {
  load(key, fallback) {
    try {
      const raw = localStorage.getItem("innkeeper." + key);
      return raw === null ? fallback : JSON.parse(raw);
    } catch {
      return fallback;
    }
  },
  save(key, value) {
    try {
      localStorage.setItem("innkeeper." + key, JSON.stringify(value));
    } catch {
      /* storage full or disabled: settings just do not persist */
    }
  },
};
