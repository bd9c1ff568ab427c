using System;
using System.Collections.Generic;
using System.Linq;
using Microsoft.FSharp.Collections;
using Microsoft.FSharp.Core;
using TorchSharp;

namespace Transcoders;

/// <summary>Conversions between C# shapes and the F# core's (options, lists, sets, maps, functions).</summary>
internal static class Interop
{
    public static FSharpOption<T> Some<T>(T? value) where T : struct =>
        value.HasValue ? FSharpOption<T>.Some(value.Value) : FSharpOption<T>.None;

    public static T? Nullable<T>(FSharpOption<T>? option) where T : struct =>
        FSharpOption<T>.get_IsSome(option) ? option!.Value : null;

    public static T? OrNull<T>(FSharpOption<T>? option) where T : class =>
        FSharpOption<T>.get_IsSome(option) ? option!.Value : null;

    public static FSharpList<T> List<T>(IEnumerable<T> items) => ListModule.OfSeq(items);

    public static FSharpSet<T> Set<T>(IEnumerable<T> items) => SetModule.OfSeq(items);

    public static FSharpMap<TKey, TValue> Map<TKey, TValue>(IEnumerable<KeyValuePair<TKey, TValue>> items) =>
        MapModule.OfSeq(items.Select(kv => Tuple.Create(kv.Key, kv.Value)));

    public static int[] Array(IReadOnlyList<int> items) => items as int[] ?? items.ToArray();

    /// <summary>Hook functions as the core takes them: (name or glob, function) in the given order.</summary>
    public static FSharpList<Tuple<string, FSharpFunc<torch.Tensor, torch.Tensor>>> Hooks(
        IEnumerable<KeyValuePair<string, Func<torch.Tensor, torch.Tensor>>>? hooks)
    {
        if (hooks is null) return FSharpList<Tuple<string, FSharpFunc<torch.Tensor, torch.Tensor>>>.Empty;
        return ListModule.OfSeq(hooks.Select(kv =>
        {
            if (kv.Key is null) throw new ArgumentException("a hook has a null hook point name", nameof(hooks));
            if (kv.Value is null) throw new ArgumentException($"the hook at '{kv.Key}' is null", nameof(hooks));
            return Tuple.Create(kv.Key, FuncConvert.FromFunc(kv.Value));
        }).ToList());
    }

    /// <summary>Token ids as an int64 tensor [pos] on <paramref name="device"/>.</summary>
    public static torch.Tensor Tokens(long[] tokens, torch.Device device)
    {
        ArgumentNullException.ThrowIfNull(tokens);
        return torch.tensor(tokens, device: device);
    }

    /// <summary>Token ids as an int64 tensor [pos] on <paramref name="device"/>.</summary>
    public static torch.Tensor Tokens(int[] tokens, torch.Device device)
    {
        ArgumentNullException.ThrowIfNull(tokens);
        var ids = new long[tokens.Length];
        for (var i = 0; i < ids.Length; i++) ids[i] = tokens[i];
        return torch.tensor(ids, device: device);
    }
}
