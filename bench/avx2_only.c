// Preloaded into a process (LD_PRELOAD) by bench/avx2_only.py: CPUID answers as an AVX2 + FMA machine's would,
// with AVX-512, VNNI (AVX-512 and AVX), AVX-512 BF16/FP16 and AMX cleared. Linux makes CPUID fault in this
// thread and every thread it starts afterwards (arch_prctl ARCH_SET_CPUID, on CPUs with the cpuid_fault flag);
// the SIGSEGV handler runs the real CPUID with faulting off for that instant, clears the bits and steps over
// the instruction. Libraries that choose their code by CPUID (XLA's LLVM target, oneDNN, ONNX Runtime's MLAS,
// GCC's __builtin_cpu_supports) then pick their AVX2 paths. glibc's own string functions were chosen before
// this runs and keep theirs. A process that installs its own SIGSEGV handler (a compiler's cc1) and then runs
// CPUID crashes: bench/avx2_only.py builds the project's kernel before it preloads this.
#define _GNU_SOURCE
#include <cpuid.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <ucontext.h>
#include <unistd.h>

#define ARCH_SET_CPUID 0x1012

static void on_segv(int sig, siginfo_t* info, void* context) {
  ucontext_t* ctx = (ucontext_t*)context;
  greg_t* regs = ctx->uc_mcontext.gregs;
  const unsigned char* rip = (const unsigned char*)regs[REG_RIP];
  if (rip[0] != 0x0f || rip[1] != 0xa2) {  // not a CPUID: a real fault, which the default action reports
    signal(SIGSEGV, SIG_DFL);
    return;
  }
  unsigned leaf = (unsigned)regs[REG_RAX], sub = (unsigned)regs[REG_RCX], a, b, c, d;
  syscall(SYS_arch_prctl, ARCH_SET_CPUID, 1);
  __cpuid_count(leaf, sub, a, b, c, d);
  syscall(SYS_arch_prctl, ARCH_SET_CPUID, 0);
  if (leaf == 7 && sub == 0) {  // avx512 f dq ifma pf er cd bw vl; vbmi vbmi2 vnni bitalg vpopcntdq; 4vnniw
                                // 4fmaps vp2intersect amx-bf16 avx512-fp16 amx-tile amx-int8
    b &= ~((1u << 16) | (1u << 17) | (1u << 21) | (1u << 26) | (1u << 27) | (1u << 28) | (1u << 30) | (1u << 31));
    c &= ~((1u << 1) | (1u << 6) | (1u << 11) | (1u << 12) | (1u << 14));
    d &= ~((1u << 2) | (1u << 3) | (1u << 8) | (1u << 22) | (1u << 23) | (1u << 24) | (1u << 25));
  } else if (leaf == 7 && sub == 1) {  // avx-vnni avx512-bf16 amx-fp16 avx-ifma; avx-vnni-int8 avx-ne-convert
                                       // amx-complex
    a &= ~((1u << 4) | (1u << 5) | (1u << 21) | (1u << 23));
    d &= ~((1u << 4) | (1u << 5) | (1u << 14));
  }
  regs[REG_RAX] = a; regs[REG_RBX] = b; regs[REG_RCX] = c; regs[REG_RDX] = d;
  regs[REG_RIP] += 2;
}

__attribute__((constructor)) static void fault_on_cpuid(void) {
  struct sigaction action;
  memset(&action, 0, sizeof action);
  action.sa_sigaction = on_segv;
  action.sa_flags = SA_SIGINFO | SA_NODEFER;
  sigaction(SIGSEGV, &action, NULL);
  if (syscall(SYS_arch_prctl, ARCH_SET_CPUID, 0) != 0) {
    perror("avx2_only: arch_prctl(ARCH_SET_CPUID), which needs the cpuid_fault CPU flag");
    exit(2);
  }
}
