/*
** flowservice.verify: RSA-SHA256 signature checks for Adobe I/O Events
** (the webhook's x-adobe-digital-signature-1/-2 over the raw body), in C
** over OpenSSL's EVP API. Its own module, linked with libcrypto, so the
** HTTP core does not depend on it.
**
**   verify.rsa_sha256(public_key_pem, message, signature_base64)
**     -> true | false, reason
**
** Arguments must be strings (else a bad-argument error). Everything else
** the world can send is a value: a key that is not an RSA public key of
** 2048 bits or more, a signature that is not base64 or does not verify,
** input past the size caps below. Nothing is kept between calls (no
** global state); every OpenSSL object is freed before Lua sees a result,
** and OpenSSL's error queue is left empty (libcurl shares it).
*/
#include <stddef.h>
#include <string.h>

#include <openssl/bio.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/pem.h>

#include "compat.h"

#define VERIFY_MAX_KEY        16384      /* a PEM public key: 8192-bit RSA is ~1.5 kB */
#define VERIFY_MAX_SIGNATURE  2048       /* base64 of an 8192-bit signature is 1368 */
#define VERIFY_MAX_MESSAGE    (1 << 20)  /* the raw body of one event */
#define VERIFY_MIN_BITS       2048

/* Base64 (newlines and padding allowed, as OpenSSL reads it) into out,
** which holds at least 3/4 of len + 3 bytes. -1 if not base64. */
static int verify_unbase64(const char *in, size_t len, unsigned char *out) {
  EVP_ENCODE_CTX *ctx = EVP_ENCODE_CTX_new();
  int n = 0, tail = 0, ok;
  if (ctx == NULL)
    return -1;
  EVP_DecodeInit(ctx);
  ok = EVP_DecodeUpdate(ctx, out, &n, (const unsigned char *)in, (int)len) >= 0
       && EVP_DecodeFinal(ctx, out + n, &tail) == 1;
  EVP_ENCODE_CTX_free(ctx);
  return ok ? n + tail : -1;
}

/* The key in pem as an RSA public key of VERIFY_MIN_BITS or more, or NULL
** with *why set. */
static EVP_PKEY *verify_key(const char *pem, size_t len, const char **why) {
  BIO *bio = BIO_new_mem_buf(pem, (int)len);
  EVP_PKEY *key;
  if (bio == NULL) {
    *why = "out of memory";
    return NULL;
  }
  key = PEM_read_bio_PUBKEY(bio, NULL, NULL, NULL);
  BIO_free(bio);
  if (key == NULL) {
    *why = "the key is not a PEM public key";
    return NULL;
  }
  if (EVP_PKEY_base_id(key) != EVP_PKEY_RSA) {
    *why = "the key is not an RSA key";
    EVP_PKEY_free(key);
    return NULL;
  }
  if (EVP_PKEY_bits(key) < VERIFY_MIN_BITS) {
    *why = "the RSA key is shorter than 2048 bits";
    EVP_PKEY_free(key);
    return NULL;
  }
  return key;
}

/* 1: the signature verifies; 0: it does not, *why says why. */
static int verify_check(const char *pem, size_t pem_len, const char *msg, size_t msg_len,
                        const char *b64, size_t b64_len, const char **why) {
  unsigned char sig[VERIFY_MAX_SIGNATURE / 4 * 3 + 3];
  EVP_PKEY *key;
  EVP_MD_CTX *ctx;
  int sig_len, rc;
  if (pem_len > VERIFY_MAX_KEY) { *why = "the key is too large"; return 0; }
  /* PEM is text; OpenSSL's reader compares the BEGIN line as a C string, so
  ** "-----BEGIN PUBLIC KEY\0junk-----" passed as a PUBLIC KEY block (found
  ** by fuzz/webhook) */
  if (memchr(pem, '\0', pem_len) != NULL) { *why = "the key is not a PEM public key"; return 0; }
  if (b64_len > VERIFY_MAX_SIGNATURE) { *why = "the signature is too large"; return 0; }
  if (msg_len > VERIFY_MAX_MESSAGE) { *why = "the message is too large"; return 0; }
  if (b64_len == 0) { *why = "the signature is empty"; return 0; }
  sig_len = verify_unbase64(b64, b64_len, sig);
  if (sig_len <= 0) { *why = "the signature is not base64"; return 0; }
  key = verify_key(pem, pem_len, why);
  if (key == NULL)
    return 0;
  ctx = EVP_MD_CTX_new();
  if (ctx == NULL) {
    EVP_PKEY_free(key);
    *why = "out of memory";
    return 0;
  }
  rc = EVP_DigestVerifyInit(ctx, NULL, EVP_sha256(), NULL, key) == 1
       && EVP_DigestVerifyUpdate(ctx, msg, msg_len) == 1
       ? EVP_DigestVerifyFinal(ctx, sig, (size_t)sig_len) : -1;
  EVP_MD_CTX_free(ctx);
  EVP_PKEY_free(key);
  if (rc == 1)
    return 1;
  *why = rc == 0 ? "the signature does not verify" : "the signature could not be checked";
  return 0;
}

static int verify_rsa_sha256(lua_State *L) {
  size_t pem_len, msg_len, b64_len;
  const char *pem = luaL_checklstring(L, 1, &pem_len);
  const char *msg = luaL_checklstring(L, 2, &msg_len);
  const char *b64 = luaL_checklstring(L, 3, &b64_len);
  const char *why = NULL;
  int ok = verify_check(pem, pem_len, msg, msg_len, b64, b64_len, &why);
  ERR_clear_error();  /* a failed parse or check leaves entries behind */
  lua_pushboolean(L, ok);
  if (ok)
    return 1;
  lua_pushstring(L, why);
  return 2;
}

int luaopen_flowservice_verify(lua_State *L) {
  static const luaL_Reg module[] = {
    {"rsa_sha256", verify_rsa_sha256}, {NULL, NULL}
  };
  lua_createtable(L, 0, 4);
  fs_setfuncs(L, module, 0);
  lua_pushliteral(L, FS_VERSION);
  lua_setfield(L, -2, "_VERSION");
  lua_pushstring(L, OpenSSL_version(OPENSSL_VERSION));
  lua_setfield(L, -2, "openssl_version");
  lua_pushinteger(L, VERIFY_MAX_MESSAGE);
  lua_setfield(L, -2, "max_message");
  return 1;
}
