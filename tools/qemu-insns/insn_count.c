/*
 * insn_count.c - a QEMU TCG plugin that counts the guest instructions a program executes
 * under user-mode emulation (qemu-aarch64 -plugin ...). Used through scripts/qemu-insns.sh,
 * which builds it and prints the total; at exit the plugin writes one line, "insns <N>",
 * through qemu_plugin_outs (QEMU's log: shown only with -d plugin, to stderr or -D FILE).
 *
 * How it counts: when QEMU translates a block of guest code (a TB), the plugin asks how many
 * guest instructions the block holds and attaches an inline "add that number to a 64-bit
 * counter" op that QEMU runs every time the block executes. No callback into this file runs
 * per block, so the overhead is one memory add per executed TB. The count is taken at block
 * entry: a block left part-way (a fault, a signal) still counts whole, a negligible error.
 *
 * Why the API is declared here: Debian 12 ships qemu-user 7.2 without QEMU's qemu-plugin.h
 * (no package has it), so this file declares the few types and functions it uses itself.
 * They must match QEMU 7.2's plugin ABI, plugin API version 1 (checked against
 * include/qemu/qemu-plugin.h and plugins/plugin.h at the v7.2.0 release commit b67b00e6b4c7):
 *   - qemu_plugin_id_t is uint64_t; qemu_info_t is only passed through here, so it stays opaque.
 *   - the plugin exports int qemu_plugin_version (QEMU 7.2 accepts 0..1) and
 *     qemu_plugin_install(id, info, argc, argv), returning 0 on success;
 *   - enum qemu_plugin_op has one member, QEMU_PLUGIN_INLINE_ADD_U64 = 0.
 * The same declarations hold through QEMU 8.x (checked at 6.0, 7.2 and 8.0). QEMU 9.0 raised
 * the minimum plugin API to 2 and removed qemu_plugin_register_vcpu_tb_exec_inline (replaced
 * by per-vCPU scoreboards), so a newer QEMU needs a rewrite against its own header, not just a
 * new version number.
 *
 * Build: gcc -shared -fPIC -O2 -fvisibility=hidden -o insn_count.so insn_count.c
 * (-fvisibility=hidden: only the two symbols QEMU looks up are exported.)
 */
#include <inttypes.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#define PLUGIN_EXPORT __attribute__((visibility("default")))

/* ---- The part of QEMU 7.2's plugin API used here (see the comment above). ---- */

typedef uint64_t qemu_plugin_id_t;
typedef struct qemu_info_t qemu_info_t; /* opaque here: never dereferenced */
struct qemu_plugin_tb;                  /* opaque handle to a block being translated */

enum qemu_plugin_op {
    QEMU_PLUGIN_INLINE_ADD_U64 = 0, /* *ptr += imm, as a 64-bit add */
};

typedef void (*qemu_plugin_vcpu_tb_trans_cb_t)(qemu_plugin_id_t id, struct qemu_plugin_tb *tb);
typedef void (*qemu_plugin_udata_cb_t)(qemu_plugin_id_t id, void *userdata);

/* Provided by the qemu-aarch64 executable, resolved when QEMU loads this library. */
void qemu_plugin_register_vcpu_tb_trans_cb(qemu_plugin_id_t id, qemu_plugin_vcpu_tb_trans_cb_t cb);
size_t qemu_plugin_tb_n_insns(const struct qemu_plugin_tb *tb);
void qemu_plugin_register_vcpu_tb_exec_inline(struct qemu_plugin_tb *tb, enum qemu_plugin_op op,
                                              void *ptr, uint64_t imm);
void qemu_plugin_register_atexit_cb(qemu_plugin_id_t id, qemu_plugin_udata_cb_t cb, void *userdata);
void qemu_plugin_outs(const char *string);

/* ---- The plugin. ---- */

/* The API version this file was written against; QEMU refuses a plugin outside its range. */
PLUGIN_EXPORT int qemu_plugin_version = 1;

/*
 * One counter shared by every vCPU. The inline add is a plain load-add-store, not atomic, so
 * a multi-threaded guest could lose increments; the measurements this serves run
 * single-threaded programs (one guest thread, one vCPU), where the count is exact.
 */
static uint64_t executed_insns;

/* At translation time: make each execution of this block add its instruction count. */
static void on_tb_translate(qemu_plugin_id_t id, struct qemu_plugin_tb *tb)
{
    (void)id;
    qemu_plugin_register_vcpu_tb_exec_inline(tb, QEMU_PLUGIN_INLINE_ADD_U64, &executed_insns,
                                             (uint64_t)qemu_plugin_tb_n_insns(tb));
}

/* When the guest exits: report the total as one line QEMU's log carries. */
static void report_at_exit(qemu_plugin_id_t id, void *userdata)
{
    char line[40];
    (void)id;
    (void)userdata;
    snprintf(line, sizeof line, "insns %" PRIu64 "\n", executed_insns);
    qemu_plugin_outs(line);
}

PLUGIN_EXPORT int qemu_plugin_install(qemu_plugin_id_t id, const qemu_info_t *info, int argc,
                                      char **argv)
{
    (void)info; /* opaque here; nothing in it is needed */
    (void)argc; /* the plugin takes no arguments */
    (void)argv;
    qemu_plugin_register_vcpu_tb_trans_cb(id, on_tb_translate);
    qemu_plugin_register_atexit_cb(id, report_at_exit, NULL);
    return 0;
}
